"""The gateway's request path to Redis: one pipelined connection per Redis node,
shared by every request of the process.

Why not a connection pool: a pool checks a connection out per command, and each
command is its own write and read. Here concurrent requests append their
commands to one buffer that goes out in a single write at the end of the event
loop's turn, and the replies come back in order through one hiredis parser:
pipelining for free, at a few microseconds per command.

Never a blind resend: a command that may have run is never sent again. A timeout
or a connection lost while a command was in flight fails that command (the HTTP
layer answers 503; clients retry under the producer / Stream-Seq rules). Only
replies that prove a command did not run lead to a resend: MOVED and ASK on a
cluster, NOSCRIPT (handled by gateway/scripts.py), and a connection that was
already known dead before the command was written (then we reconnect first).

A reply that arrives after its command timed out is read and dropped; a
connection whose oldest command has waited several timeouts is closed, so a
server that stopped answering (SIGSTOP, a network partition) is reconnected
instead of holding requests forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.crc import key_slot as _crc_key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("dsgw.redis")

# A connection is closed when its oldest command has waited this many timeouts.
STALL_TIMEOUTS = 3
MAX_REDIRECTS = 3


class _ReplyError(Exception):
    """An error reply, as hiredis builds it; converted to redis-py's classes."""


def _error(reply: _ReplyError) -> RedisError:
    text = str(reply)
    kind = text.split(" ", 1)[0]
    if kind == "NOSCRIPT":
        return NoScriptError(text)
    if kind == "MOVED":
        return MovedError(text.split(" ", 1)[1])
    if kind == "ASK":
        return AskError(text.split(" ", 1)[1])
    if kind == "LOADING":
        return BusyLoadingError(text)
    if kind == "READONLY":
        return ReadOnlyError(text)
    if kind in ("NOAUTH", "WRONGPASS", "NOPERM"):
        return AuthenticationError(text)
    return ResponseError(text)


class NodeConnection(asyncio.Protocol):
    """One TCP connection to one Redis server, commands pipelined over it."""

    def __init__(self, host: str, port: int, *, timeout_s: float, setup: list[tuple[Any, ...]]) -> None:
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self._timeout_s = timeout_s
        self._setup = setup  # AUTH / SELECT / CLIENT SETNAME, sent on every (re)connect
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=_ReplyError)
        # (future, deadline) per command in flight, oldest first; Redis answers in order.
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._expired = 0  # how many of the oldest pending commands already timed out
        self._outbox: list[bytes] = []
        self._connecting: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.closed_by_us = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while (reply := reader.gets()) is not False:
            if not pending:
                continue  # cannot happen with a well-behaved server
            future, _ = pending.popleft()
            if self._expired:
                self._expired -= 1
            if future.done():
                continue  # timed out or its caller went away: drop the late reply
            if isinstance(reply, _ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._reader = hiredis.Reader(replyError=_ReplyError)
        self._outbox.clear()
        if self._timer:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, collections.deque()
        self._expired = 0
        if pending:
            log.warning("redis connection lost with commands in flight", extra={"fields": {
                "node": self.address, "in_flight": len(pending), "error": str(exc or "closed")}})  # fmt: skip
        error = ConnectionError(f"connection to {self.address} lost")
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)

    # --- commands -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        if self.connected:
            return
        if self._connecting is None:
            self._connecting = self._loop.create_future()
            try:
                await asyncio.wait_for(
                    self._loop.create_connection(lambda: self, self.host, self.port), self._timeout_s
                )
                replies = [self.send_nowait(command) for command in self._setup]
                for reply in replies:
                    await reply
                self._connecting.set_result(None)
            except BaseException as exc:
                self._close_transport()
                failure = (
                    exc
                    if isinstance(exc, RedisError)
                    else ConnectionError(f"cannot connect to {self.address}: {type(exc).__name__}: {exc}")
                )
                self._connecting.set_exception(failure)
                self._connecting.exception()  # retrieved: no "never retrieved" warning
                raise failure from None
            finally:
                self._connecting = None
        else:
            await asyncio.shield(self._connecting)

    def send_nowait(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one command (connected or not: the caller checked) and return
        the future of its reply. All commands queued in one turn of the event
        loop leave in one write."""
        future: asyncio.Future[Any] = self._loop.create_future()
        deadline = self._loop.time() + self._timeout_s
        self._pending.append((future, deadline))
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(hiredis.pack_command(command))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)
        return future

    async def execute(self, *command: Any) -> Any:
        if not self.connected:
            await self.connect()
        return await self.send_nowait(command)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self._transport is not None and outbox:
            self._transport.write(b"".join(outbox))

    def _expire(self) -> None:
        """Fail commands past their deadline; close a connection that stalled."""
        self._timer = None
        now = self._loop.time()
        pending = self._pending
        while self._expired < len(pending):
            future, deadline = pending[self._expired]
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                break
            if not future.done():
                future.set_exception(
                    RedisTimeoutError(f"no answer from {self.address} in {self._timeout_s:g} s")
                )
            self._expired += 1
        if pending and now - pending[0][1] > (STALL_TIMEOUTS - 1) * self._timeout_s:
            log.warning("redis connection stalled: closing it", extra={"fields": {"node": self.address}})
            self._close_transport()
        elif self._timer is None and self._expired and pending:
            # Only expired commands wait: look again later to close a stalled connection.
            self._timer = self._loop.call_later(self._timeout_s, self._expire)

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails what is still pending
        self._transport = None

    def close(self) -> None:
        self.closed_by_us = True
        self._close_transport()


def parse_url(url: str, client_name: str) -> tuple[str, int, list[tuple[Any, ...]]]:
    """(host, port, setup commands) from a redis:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", ""):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://)")
    setup: list[tuple[Any, ...]] = []
    if parts.password is not None:
        password = unquote(parts.password)
        username = unquote(parts.username) if parts.username else None
        setup.append(("AUTH", username, password) if username else ("AUTH", password))
    db = parts.path.lstrip("/")
    if db and db != "0":
        setup.append(("SELECT", int(db)))
    if client_name:
        setup.append(("CLIENT", "SETNAME", client_name))
    return parts.hostname or "127.0.0.1", parts.port or 6379, setup


class RedisMux:
    """A single Redis server."""

    cluster = False

    def __init__(self, url: str, *, timeout_s: float, client_name: str = "") -> None:
        host, port, setup = parse_url(url, client_name)
        self._node = NodeConnection(host, port, timeout_s=timeout_s, setup=setup)

    async def execute(self, *command: Any, key: str | None = None, retry_if_lost: bool = False) -> Any:
        """Run one command. `retry_if_lost`: for commands that change nothing,
        try once more on a fresh connection if the connection died under it."""
        return await self.run(command, key, retry_if_lost)

    async def run(self, command: tuple[Any, ...], key: str | None, retry_if_lost: bool) -> Any:
        """`execute` for a command already in a tuple: the hot path (one
        coroutine less to resume per command)."""
        node = self._node
        if not node.connected:
            await node.connect()
        try:
            return await node.send_nowait(command)
        except ConnectionError:
            if not retry_if_lost:
                raise
            return await node.execute(*command)

    async def ping_all(self) -> dict[str, bool]:
        return {self._node.address: await _answers_ping(self._node)}

    async def close(self) -> None:
        self._node.close()


@lru_cache(maxsize=4096)
def key_slot(key: str) -> int:
    """The cluster slot of a key (its hash tag's; ours are {sNN})."""
    return int(_crc_key_slot(key.encode()))


class ClusterMux:
    """A Redis Cluster: one pipelined connection per master, commands routed by
    the slot of their key, the slot map refreshed on MOVED."""

    cluster = True

    def __init__(self, url: str, *, timeout_s: float, client_name: str = "") -> None:
        host, port, setup = parse_url(url, client_name)
        self._seeds = [(host, port)]
        self._timeout_s = timeout_s
        self._setup = setup
        self._nodes: dict[str, NodeConnection] = {}
        self._slots: list[str] = []  # slot -> "host:port" of its master
        self._refreshing: asyncio.Task[None] | None = None

    def _node(self, address: str) -> NodeConnection:
        node = self._nodes.get(address)
        if node is None:
            host, _, port = address.rpartition(":")
            node = self._nodes[address] = NodeConnection(
                host, int(port), timeout_s=self._timeout_s, setup=self._setup
            )
        return node

    async def refresh_slots(self) -> None:
        errors = []
        candidates = [*self._seeds, *((n.host, n.port) for n in self._nodes.values())]
        for host, port in dict.fromkeys(candidates):
            try:
                reply = await self._node(f"{host}:{port}").execute("CLUSTER", "SLOTS")
            except RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            slots = [""] * 16384
            for start, end, master, *_ in reply:
                master_host = master[0].decode() if master[0] else host
                address = f"{master_host}:{int(master[1])}"
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = address
            self._slots = slots
            self._seeds = list(dict.fromkeys([(host, port), *self._seeds]))[:8]
            return
        raise ConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh_slots())
            self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def execute(self, *command: Any, key: str | None = None, retry_if_lost: bool = False) -> Any:
        return await self.run(command, key, retry_if_lost)

    async def run(self, command: tuple[Any, ...], key: str | None, retry_if_lost: bool) -> Any:
        if not self._slots:
            await self.refresh_slots()
        address = self._slots[key_slot(key)] if key is not None else next(iter(self._nodes), "")
        if not address:
            raise ConnectionError("no cluster node serves this key's slot")
        asking = False
        retried = False
        for _ in range(MAX_REDIRECTS + 1):
            node = self._node(address)
            try:
                if asking:
                    if not node.connected:
                        await node.connect()
                    node.send_nowait(("ASKING",))
                    return await node.send_nowait(command)
                return await node.execute(*command)
            except MovedError as exc:
                # The command did not run: send it where the slot lives now.
                address = _redirect_address(exc)
                if key is not None:
                    self._slots[key_slot(key)] = address
                self._refresh_soon()
                asking = False
            except AskError as exc:
                address, asking = _redirect_address(exc), True
            except ConnectionError:
                self._refresh_soon()  # a failover may have moved the slot
                if not retry_if_lost or retried:
                    raise
                retried = True
        raise ResponseError("too many cluster redirects")

    async def ping_all(self) -> dict[str, bool]:
        """Every master, by address: does it answer PING?"""
        with contextlib.suppress(RedisError):
            await self.refresh_slots()
        masters = sorted(set(self._slots) - {""})

        results = await asyncio.gather(*(_answers_ping(self._node(a)) for a in masters))
        return dict(zip(masters, results, strict=True))

    async def close(self) -> None:
        if self._refreshing:
            self._refreshing.cancel()
        for node in self._nodes.values():
            node.close()


# A health check answers within this, whatever the command timeout.
PING_TIMEOUT_S = 1.0


async def _answers_ping(node: NodeConnection) -> bool:
    try:
        return await asyncio.wait_for(node.execute("PING"), PING_TIMEOUT_S) in (b"PONG", "PONG")
    except (RedisError, TimeoutError):
        return False


def _redirect_address(exc: RedisError) -> str:
    # "MOVED 3999 127.0.0.1:6381" arrives as args "3999 127.0.0.1:6381"
    return str(exc.args[0]).split(" ")[1]


Mux = RedisMux | ClusterMux


async def connect_mux(
    url: str, *, cluster: bool, timeout_s: float, client_name: str
) -> RedisMux | ClusterMux:
    mux: RedisMux | ClusterMux
    if cluster:
        mux = ClusterMux(url, timeout_s=timeout_s, client_name=client_name)
        await mux.refresh_slots()
    else:
        mux = RedisMux(url, timeout_s=timeout_s, client_name=client_name)
    return mux
