"""The web console at /console: a page (plain HTML/JS/CSS from gateway/console/,
no build step) and the two JSON endpoints it reads, which show what `dsgw
streams` and `dsgw info` show: streams with their size, producers and sink lag.

Everything else the page does (live tail, create, append, delete) goes through
the stream API itself, with the bearer token the user pasted, so the gateway's
authentication and scopes apply unchanged. The page and its assets hold no data
and are public (a browser cannot send a bearer token when it navigates); the
JSON endpoints need a credential when auth is on: the listing shows the streams
it may read, a stream's details need read on that stream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import auth
from .http import StreamRequest, reply_from
from .inspect import list_streams, shard_sink_lag, stream_info
from .keys import stream_keys
from .protocol import ProblemError, bad_request

if TYPE_CHECKING:
    from .app import Gateway

ASSETS = Path(__file__).parent / "console"
# Path, file, content type. Served from the package; `no-cache` so an upgraded
# gateway's page is never mixed with an old script.
PAGES = [
    ("/console", "index.html", "text/html; charset=utf-8"),
    ("/console/console.js", "console.js", "text/javascript; charset=utf-8"),
    ("/console/console.css", "console.css", "text/css; charset=utf-8"),
]
API_STREAMS = "/console/api/streams"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


def problem_response(error: ProblemError) -> Response:
    reply = reply_from(error)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers}
    return Response(reply.body, reply.status, headers=headers)


class ConsoleAccess:
    """The console's access hook: the same bearer check as the stream API
    (gateway/auth.py), or nothing when auth is off."""

    def __init__(self, gateway: Gateway) -> None:
        self.authenticator = auth.authenticator(gateway.settings)

    async def grant(self, request: Request) -> auth.Grant | None:
        """The request's credential (401 without a valid one); None when auth is off."""
        if self.authenticator is None:
            return None
        return await self.authenticator.grant(StreamRequest(request.scope, request.receive, ""))

    @staticmethod
    def may_read(grant: auth.Grant | None, name: str) -> bool:
        return grant is None or grant.scopes.allows("read", name)


async def stream_rows(gateway: Gateway, limit: int) -> list[dict[str, Any]]:
    """`dsgw streams`' rows, plus each stream's producer count and its shard's sink lag."""
    redis = gateway.redis
    rows = await list_streams(redis, limit)
    if not rows:
        return rows
    pipe = redis.pipeline(transaction=False)
    for row in rows:
        keys = stream_keys(row["name"])
        pipe.hlen(keys.producers)
        pipe.hget(keys.meta, "sink")
    replies = await pipe.execute()
    # The sink's lag is per shard: ask once per shard, not once per stream.
    lags: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        row["producers"] = int(replies[2 * i])
        synced = replies[2 * i + 1] in (b"1", "1")
        row["synced_to_postgres"] = synced
        row["sink"] = None
        if synced:
            feed = stream_keys(row["name"]).feed
            if feed not in lags:
                lags[feed] = await shard_sink_lag(redis, feed)
            row["sink"] = lags[feed]
    return rows


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request("Invalid limit", f"a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def console_routes(gateway: Gateway) -> list[BaseRoute]:
    """The console's routes, for create_app (empty when DSGW_CONSOLE is off)."""
    if not gateway.settings.console:
        return []
    access = ConsoleAccess(gateway)

    def page(file: str, content_type: str):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            return FileResponse(ASSETS / file, media_type=content_type, headers={"cache-control": "no-cache"})

        return endpoint

    async def streams(request: Request) -> Response:
        try:
            grant = await access.grant(request)
            limit = parse_limit(request.query_params.get("limit"))
        except ProblemError as exc:
            return problem_response(exc)
        rows = [r for r in await stream_rows(gateway, limit) if access.may_read(grant, r["name"])]
        return JSONResponse({"streams": rows, "auth": grant is not None})

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            grant = await access.grant(request)
            if not access.may_read(grant, name):
                raise auth.forbidden("read", name)
            info = await stream_info(gateway.redis, name)
            if info is None:
                raise ProblemError(404, "Stream not found", name[:200])
        except ProblemError as exc:
            return problem_response(exc)
        return JSONResponse(info)

    routes: list[BaseRoute] = [
        Route(path, page(file, content_type), methods=["GET"]) for path, file, content_type in PAGES
    ]
    routes += [
        Route(API_STREAMS, streams, methods=["GET"]),
        Route(API_STREAMS + "/{name:path}", stream, methods=["GET"]),
    ]
    return routes
