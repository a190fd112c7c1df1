"""The ASGI application: wiring, lifespan, health, metrics, and the middleware
that puts security and CORS headers on every response."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
import time
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.exceptions import RedisError
from sse_starlette.sse import AppStatus
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, logs, metrics
from .console import console_routes
from .http import ClientGone, Headers, Reply, StreamRequest, problem_reply
from .layout import LayoutMismatch, check_layout
from .live import LiveHub
from .openapi import openapi_routes
from .redis_client import connect
from .routes import STREAM_PREFIX, StreamRoutes
from .settings import Settings
from .shard_stats import shard_stats_forever
from .store import Store
from .stores import configured_store
from .subscriptions.service import SubscriptionService
from .sweeper import sweep_forks_forever
from .tiering.history import History

log = logging.getLogger("dsgw.app")
access = logging.getLogger("dsgw.access")


# Request ids: a random per-process prefix and a counter (cheaper than uuid4).
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            if 0 < len(value) <= 64 and value.isascii() and value.decode().isprintable():
                return value.decode()
            break
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


# Request headers a browser client sends, and response headers it must be able to read.
CORS_ALLOW_HEADERS = (
    "content-type, stream-ttl, stream-expires-at, stream-closed, stream-seq, stream-forked-from, "
    "stream-fork-offset, stream-fork-sub-offset, producer-id, producer-epoch, producer-seq, "
    "if-none-match, cache-control, authorization, x-request-id"
)
CORS_EXPOSE_HEADERS = (
    "stream-next-offset, stream-up-to-date, stream-closed, stream-cursor, stream-ttl, "
    "stream-expires-at, stream-sse-data-encoding, producer-epoch, producer-seq, "
    "producer-expected-seq, producer-received-seq, etag, location, content-type, x-request-id, "
    "stream-earliest-offset, stream-hot-offset"
)


class Gateway:
    """Everything one gateway process holds: settings, Redis, store, live hub.
    The Redis side is set up in `start`, once we know what REDIS_URL names."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Set once the server is shutting down: live readers finish at once
        # (long-poll answers 204, SSE ends cleanly) so in-flight work can drain.
        self.draining = False
        self._drain_watch: asyncio.Task[None] | None = None
        self._fork_sweeper: asyncio.Task[None] | None = None
        self._shard_stats: asyncio.Task[None] | None = None
        self.redis: aioredis.Redis
        self.target: Any
        self.store: Store
        self.hub: LiveHub
        # /v1/stream/__ds/... and the wake dispatcher (gateway/subscriptions/).
        self.subscriptions: SubscriptionService | None = None

    async def start(self) -> None:
        s = self.settings
        target = await connect(
            s.redis_url,
            max_connections=s.redis_max_connections,
            pool_timeout_s=s.redis_pool_timeout_s,
            # Shows which process holds a connection in `redis-cli CLIENT LIST`.
            name=f"dsgw-gateway-{os.getpid()}",
            timeout_s=s.redis_timeout_ms / 1000,
        )
        try:
            await check_layout(target.client)  # never re-key a deployment's streams silently
        except LayoutMismatch as exc:
            log.error("refusing to start: %s", exc)
            await target.close()
            raise
        self.target = target
        self.redis = target.client
        self.store = configured_store(target.mux, target.publish_command, s)
        if s.history_database_url:
            # Connects on the first cold read: no Postgres needed to start.
            self.store.history = History(
                s.history_database_url,
                timeout_s=s.history_timeout_ms / 1000,
                max_connections=s.history_max_connections,
            )
        self.hub = LiveHub(self.redis, recheck_s=s.live_recheck_ms / 1000, sharded=target.sharded_pubsub)
        log.info(
            "connected to redis",
            extra={"fields": {"cluster": target.cluster, "version": ".".join(map(str, target.version)),
                              "publish": target.publish_command}},
        )  # fmt: skip
        await self.hub.start()
        self._drain_watch = asyncio.create_task(self._watch_for_shutdown())
        self._fork_sweeper = asyncio.create_task(sweep_forks_forever(self.store, s.fork_sweep_ms / 1000))
        if s.shard_stats_s > 0:
            self._shard_stats = asyncio.create_task(shard_stats_forever(target, s.shard_stats_s))
        self.subscriptions = SubscriptionService(self)
        self.subscriptions.start()

    async def _watch_for_shutdown(self) -> None:
        """uvicorn keeps serving in-flight requests after SIGTERM but tells no
        one; its signal handler is a method of its Server, whose should_exit
        flips. Poll that, then wake every live reader."""
        while True:
            handler = signal.getsignal(signal.SIGTERM)
            server = getattr(handler, "__self__", None)
            if getattr(server, "should_exit", False):
                break
            await asyncio.sleep(0.2)
        log.info("draining: ending live reads")
        self.draining = True
        self.hub.wake_all()

    async def stop(self) -> None:
        if self._drain_watch:
            self._drain_watch.cancel()
        if self._fork_sweeper:
            self._fork_sweeper.cancel()
        if self._shard_stats:
            self._shard_stats.cancel()
        if self.subscriptions:
            await self.subscriptions.stop()
        await self.hub.stop()
        if self.store.history:
            await self.store.history.close()
        await self.target.close()


class EdgeMiddleware:
    """Security headers and CORS on every response, OPTIONS preflights, request
    ids (X-Request-Id, in every log line of the request), the access log, and
    the log line of any unhandled error."""

    def __init__(self, app: ASGIApp, settings: Settings, streams: StreamRoutes) -> None:
        self.app = app
        # Stream requests go straight to their handlers: FastAPI's routing and
        # middleware layers cost more than the rest of an append together.
        self.streams = streams
        self.access_log = settings.access_log
        origins = settings.cors_origins
        self.any_origin = "*" in origins
        self.origins = {o.encode() for o in origins}
        self.static = [
            (b"x-content-type-options", b"nosniff"),
            (b"cross-origin-resource-policy", settings.cross_origin_resource_policy.encode()),
            (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()),
        ]

    def _cors(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        for key, value in scope["headers"]:
            if key == b"origin" and value in self.origins:
                return [(b"access-control-allow-origin", value), (b"vary", b"origin")]
        return []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        token = logs.request_id.set(rid)
        extra = [*self.static, *self._cors(scope), (b"x-request-id", rid.encode())]
        try:
            await self._handle(scope, receive, send, extra)
        finally:
            logs.request_id.reset(token)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, extra: list[tuple[bytes, bytes]]
    ) -> None:
        if scope["method"] == "OPTIONS":
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": extra
                    + [
                        (b"access-control-allow-methods", b"GET, HEAD, PUT, POST, DELETE, OPTIONS"),
                        (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
                        (b"access-control-max-age", b"86400"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        status = 0
        begun = time.perf_counter()
        is_stream = scope["path"].startswith(STREAM_PREFIX)
        try:
            if is_stream:
                status = await self._stream(scope, receive, send, extra)
            else:
                status = await self._other(scope, receive, send, extra)
        finally:
            metrics.count_request(
                scope["method"],
                "stream" if is_stream else scope["path"][:32],
                status,
                time.perf_counter() - begun,
            )
            if self.access_log:
                access.info(
                    "request",
                    extra={"fields": {"method": scope["method"], "path": scope["path"], "status": status,
                                      "ms": round((time.perf_counter() - begun) * 1000, 2)}},
                )  # fmt: skip

    async def _stream(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> int:
        request = StreamRequest(scope, receive, scope["path"][len(STREAM_PREFIX) :])
        try:
            return await self.streams.handle(request, send, extra)
        except ClientGone:
            return 499  # nginx's word for it: nothing is sent
        except RedisError as exc:
            reply = storage_unavailable(exc)
        except Exception:
            log.exception("unhandled error")
            reply = problem_reply(500, "Internal error", f"request {logs.request_id.get() or ''}")
        try:
            await reply.send(send, extra)
        except Exception:
            return 499  # already answering (SSE): the connection just ends
        return reply.status

    async def _other(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> int:
        started = False
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error")
            if not started:
                await problem_reply(500, "Internal error", f"request {logs.request_id.get() or ''}").send(
                    send, extra
                )
                return 500
        return status


def storage_unavailable(exc: Exception) -> Reply:
    # No client reset here: stream operations use gateway/redis_mux.py, which
    # keeps its own slot map and reconnects a dead connection by itself.
    log.warning("storage unavailable: %s: %s", type(exc).__name__, exc)
    return problem_reply(503, "Storage unavailable", type(exc).__name__, {"retry-after": "1"})


def create_app(settings: Settings | None = None) -> Any:
    settings = settings or Settings.from_env()
    # sse-starlette would cut SSE responses off mid-stream on SIGTERM; our event
    # generators end themselves (Gateway.draining), so clients see a clean end.
    AppStatus.disable_automatic_graceful_drain()
    logs.setup(settings.log_level)
    gateway = Gateway(settings)
    routes = StreamRoutes(gateway)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        await gateway.start()
        routes.reads.start_sweeper()
        flusher = asyncio.ensure_future(metrics.flush_every_second())
        log.info("gateway started", extra={"fields": {"version": __version__}})
        try:
            yield
        finally:
            flusher.cancel()
            routes.reads.stop_sweeper()
            await gateway.stop()
            metrics.process_exited(os.getpid())
            log.info("gateway stopped")

    app = FastAPI(
        title="ds-gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = gateway

    async def redis_error(request: Request, exc: Exception) -> Response:
        # Inside the app, so Starlette's catch-all does not turn it into a 500.
        reply = storage_unavailable(exc)
        return Response(reply.body, reply.status, headers={k.decode(): v.decode() for k, v in reply.headers})

    async def internal_error(request: Request, exc: Exception) -> Response:
        # A problem body even for a bug; EdgeMiddleware logs the traceback.
        detail = f"request {logs.request_id.get() or ''}"
        return JSONResponse({"type": "about:blank", "status": 500, "title": "Internal error", "detail": detail},
                            500, media_type="application/problem+json")  # fmt: skip

    app.add_exception_handler(RedisError, redis_error)
    app.add_exception_handler(Exception, internal_error)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Ready while any Redis node answers: one unreachable cluster master
        # must not take every replica out of the balancer (requests for its
        # shards get 503s; the others go on). The body names each node.
        nodes = await gateway.store.mux.ping_all()
        checks = {"redis": any(nodes.values()), "subscription": gateway.hub.ready}
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", **checks, "redis_nodes": nodes}
        return JSONResponse(body, 200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"content-type": content_type})

    app.router.routes.extend(
        [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *openapi_routes(settings),  # /openapi.json
            *console_routes(gateway),  # /console (DSGW_CONSOLE)
        ]
    )
    return EdgeMiddleware(app, settings, routes)
