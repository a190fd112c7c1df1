"""Rate limits per credential, shared by every replica through Redis
(gateway/lua/ratelimit.lua), and the request guard that runs authentication
(gateway/auth.py) and the limits before a stream request is handled.

- DSGW_RATE_APPENDS_PER_S: POSTs per second per credential.
- DSGW_RATE_LIVE_CONNECTIONS: long-polls and SSE connections open at once.

A credential is the grant's subject (JWT iss+sub, or the API key's name);
without authentication it is the client's address. Excess gets 429 with
Retry-After, and changes nothing."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from . import auth
from .http import StreamRequest
from .keys import rate_key
from .protocol import ProblemError
from .scripts import script_sha, script_source

if TYPE_CHECKING:
    from .app import Gateway

SCRIPT = "ratelimit"
# Where the guard leaves (limiter, identity) for the live reads' lease.
SCOPE_LIMITS = "dsgw.ratelimit"
# A live connection's lease outlasts the longest it can live (its SSE lifetime
# or long-poll timeout) by this much; a release ends it sooner.
LEASE_MARGIN_MS = 10_000

Guard = Callable[[StreamRequest, str], Awaitable[None]]


def too_many(what: str, retry_ms: int) -> ProblemError:
    seconds = max(1, math.ceil(retry_ms / 1000))
    return ProblemError(429, "Too many requests", what, headers={"retry-after": str(seconds)})


class RateLimiter:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        s = gateway.settings
        self.appends_per_s = s.rate_appends_per_s
        self.live_connections = s.rate_live_connections
        self.lease_ms = max(s.sse_max_lifetime_ms, s.long_poll_timeout_ms) + LEASE_MARGIN_MS
        self._sha = script_sha(SCRIPT)

    async def _call(self, key: str, *args: Any) -> int:
        mux = self.gw.store.mux
        try:
            return int(await mux.execute("EVALSHA", self._sha, 1, key, *args, key=key))
        except NoScriptError:
            await mux.execute("SCRIPT", "LOAD", script_source(SCRIPT), key=key)
            return int(await mux.execute("EVALSHA", self._sha, 1, key, *args, key=key))

    async def admit_append(self, identity: str) -> None:
        if self.appends_per_s > 0:
            retry_ms = await self._call(rate_key(identity, "appends"), "append", self.appends_per_s)
            if retry_ms:
                raise too_many(f"at most {self.appends_per_s} appends per second", retry_ms)

    @asynccontextmanager
    async def live_slot(self, identity: str) -> AsyncIterator[None]:
        """Hold one of the credential's live connections while the body runs."""
        if self.live_connections <= 0:
            yield
            return
        key = rate_key(identity, "live")
        conn = secrets.token_hex(8)
        retry_ms = await self._call(key, "acquire", self.live_connections, conn, self.lease_ms)
        if retry_ms:
            raise too_many(f"at most {self.live_connections} live connections", retry_ms)
        try:
            yield
        finally:
            await self._call(key, "release", self.live_connections, conn)


def identity(request: StreamRequest) -> str:
    grant: auth.Grant | None = request.scope.get(auth.SCOPE_GRANT)
    if grant is not None:
        return grant.subject
    client = request.scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


def request_guard(gateway: Gateway) -> Guard | None:
    """What runs before every stream request, or None when neither
    authentication nor a rate limit is on (the hot path then checks one attribute)."""
    authenticator = auth.authenticator(gateway.settings)
    s = gateway.settings
    limiter = RateLimiter(gateway) if s.rate_appends_per_s > 0 or s.rate_live_connections > 0 else None
    if authenticator is None and limiter is None:
        return None

    async def guard(request: StreamRequest, name: str) -> None:
        if authenticator is not None:
            await authenticator.authorize(request, name)
        if limiter is not None:
            who = identity(request)
            if request.method == "POST":
                await limiter.admit_append(who)
            elif request.method == "GET":
                request.scope[SCOPE_LIMITS] = (limiter, who)

    return guard


@asynccontextmanager
async def live_slot(request: StreamRequest) -> AsyncIterator[None]:
    """For gateway/reads.py: hold a live-connection slot if a limit is on."""
    limits = request.scope.get(SCOPE_LIMITS)
    if limits is None:
        yield
        return
    limiter, who = limits
    async with limiter.live_slot(who):
        yield
