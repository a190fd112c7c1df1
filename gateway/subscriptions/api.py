"""HTTP routes under /v1/stream/__ds/ (PROTOCOL.md sections 6 and 7):

    GET                      __ds/jwks.json
    PUT | GET | DELETE       __ds/subscriptions/{id}
    POST                     __ds/subscriptions/{id}/streams
    DELETE                   __ds/subscriptions/{id}/streams/{path}
    POST                     __ds/subscriptions/{id}/callback | claim | ack | release

Authentication, when the gateway's is on (gateway/auth.py): jwks.json is
public (receivers fetch it); callback, ack and release carry the wake's own
bearer token instead (signing.py) and are checked by fencing, never by a
service token; managing a subscription (PUT, DELETE, adding and removing
streams) needs a token whose `manage` globs cover `__ds/subscriptions/{id}`,
reading it (GET) and claiming its wakes need `read` on that same path."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.types import Send

from .. import auth
from ..http import Headers, Reply, StreamRequest, reply_from
from ..protocol import ProblemError
from .config import subscription_id
from .errors import SubError, invalid, json_reply

if TYPE_CHECKING:
    from .core import Subscriptions

MAX_BODY_BYTES = 1024 * 1024
ACTIONS = ("callback", "claim", "ack", "release")


class SubscriptionRoutes:
    def __init__(self, subs: Subscriptions) -> None:
        self.subs = subs
        self.authn = auth.authenticator(subs.settings)

    async def handle(self, request: StreamRequest, send: Send, extra: Headers) -> int:
        if not self.subs.listen_url:
            server = request.scope.get("server")
            if server:
                host = f"[{server[0]}]" if ":" in server[0] else server[0]
                self.subs.listen_url = f"http://{host}:{server[1]}"
        try:
            reply = await self.route(request)
        except SubError as exc:
            reply = exc.reply()
        except ProblemError as exc:
            reply = reply_from(exc)
        await reply.send(send, extra)
        return reply.status

    async def route(self, request: StreamRequest) -> Reply:
        method = request.method
        parts = request.name.split("/", 3)  # "__ds", "subscriptions", id, rest
        if request.name == "__ds/jwks.json":
            _allow(method, "GET")
            body = json.dumps((await self.subs.signing()).jwks()).encode()
            headers = [
                (b"content-type", b"application/jwk-set+json"),
                (b"cache-control", b"public, max-age=300"),
            ]
            return Reply(200, headers, body)
        if len(parts) < 3 or parts[1] != "subscriptions" or not parts[2]:
            raise SubError("SUBSCRIPTION_NOT_FOUND", "no such Durable Streams control route", 404)
        sub_id = subscription_id(parts[2])
        rest = parts[3] if len(parts) > 3 else ""
        subs = self.subs
        if rest == "":
            if method == "GET":
                await self._authorize(request, "read", sub_id)
                return json_reply(200, await subs.get(sub_id, request.query_one("streams_cursor")))
            if method == "PUT":
                await self._authorize(request, "manage", sub_id)
                created, record = await subs.create(sub_id, await _json(request))
                return json_reply(201 if created else 200, record)
            _allow(method, "DELETE", also="GET, PUT")
            await self._authorize(request, "manage", sub_id)
            await subs.delete(sub_id)
            return Reply(204)
        if rest == "streams":
            _allow(method, "POST")
            await self._authorize(request, "manage", sub_id)
            await subs.add_streams(sub_id, await _json(request))
            return Reply(204)
        if rest.startswith("streams/"):
            _allow(method, "DELETE")
            await self._authorize(request, "manage", sub_id)
            await subs.remove_stream(sub_id, rest[len("streams/") :])
            return Reply(204)
        if rest not in ACTIONS:
            raise SubError("SUBSCRIPTION_NOT_FOUND", "no such Durable Streams control route", 404)
        _allow(method, "POST")
        if rest == "claim":
            await self._authorize(request, "read", sub_id)
            return json_reply(200, await subs.claim(sub_id, await _json(request)))
        token = _bearer(request)
        body = await _json(request)
        if rest == "release":
            await subs.release(sub_id, token, body)
            return Reply(204)
        return json_reply(200, await subs.ack(sub_id, token, body, "pull-wake" if rest == "ack" else ""))

    async def _authorize(self, request: StreamRequest, operation: str, sub_id: str) -> None:
        if self.authn is None:
            return
        grant = await self.authn.grant(request)
        name = f"__ds/subscriptions/{sub_id}"
        if not grant.scopes.allows(operation, name):
            raise auth.forbidden(operation, name)


def _allow(method: str, allowed: str, also: str = "") -> None:
    """405 unless `method` is `allowed`; `Allow` lists it and the methods the
    caller already handled (`also`)."""
    if method != allowed:
        listed = f"{also}, {allowed}" if also else allowed
        raise ProblemError(405, "Method not allowed", headers={"allow": listed})


def _bearer(request: StreamRequest) -> str | None:
    header = request.header(b"authorization") or ""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _json(request: StreamRequest) -> Any:
    raw = await request.body(MAX_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid("the body is not valid JSON") from exc
