"""GET and HEAD on /v1/stream/{name}: catch-up, long-poll and SSE reads.

Live readers (long-poll, SSE) of one replica share their Redis reads (single
flight, gateway/live.py wakes them), count against DSGW_MAX_LIVE_CONNECTIONS,
notice a departed client at once, and an SSE reader that stops taking data is
cut off after DSGW_SSE_SEND_TIMEOUT_MS (it resumes from its last offset)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from starlette.types import Receive, Send

from . import metrics, sse
from .auth import SCOPE_DEADLINE
from .http import Headers, Reply, StreamRequest, abort_connection
from .keys import stream_keys
from .live import Watch
from .offsets import ZERO_ID, BadOffset, EntryId, format_offset, parse_entry_id, parse_offset
from .protocol import ProblemError, bad_request, next_cursor, sse_needs_base64
from .ratelimit import live_slot
from .sse_fanout import DirectWriter, Fanout, ParkedReader
from .store_model import ReadResult
from .tiering.cold import retained_headers

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("dsgw.reads")

START = "-1"
NOW = "now"
_CACHE_HISTORICAL = b"public, max-age=60, stale-while-revalidate=300"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match: a list of tags (weak ones compare by value), or '*'."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class StreamReads:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self._reads_in_flight: dict[tuple[str, EntryId, int], asyncio.Future[ReadResult]] = {}
        self.live_connections = 0
        # SSE connections now blocked in a send, and since when: a sweeper cuts
        # those blocked longer than the send timeout.
        self._blocked_sends: dict[asyncio.Task[None], float] = {}
        self._cut: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # SSE readers at their stream's tail get new events written by one
        # pump per stream instead of waking up for each (gateway/sse_fanout.py).
        self.fanout = Fanout(
            self._live_read, lambda result, binary, cursor: _sse_event(result, binary, cursor, False)
        )

    # --- HEAD ------------------------------------------------------------------

    async def head(self, name: str) -> Reply:
        meta = (await self.gw.store.read(name, None, touch=False, max_bytes=0, max_entries=0)).meta
        headers = [
            (b"content-type", meta.content_type.encode("latin-1")),
            (b"stream-next-offset", meta.tail_offset.encode()),
            (b"cache-control", b"no-store"),
        ]
        if meta.ttl is not None:
            headers.append((b"stream-ttl", b"%d" % meta.ttl))
        if meta.expires_at:
            headers.append((b"stream-expires-at", meta.expires_at.encode("latin-1")))
        if meta.closed:
            headers.append((b"stream-closed", b"true"))
        headers += retained_headers(meta.trim, self.gw.store.history is not None)
        return Reply(200, headers)

    # --- GET ---------------------------------------------------------------------

    async def get(self, request: StreamRequest, name: str, send: Send, extra: Headers) -> Reply | None:
        """The reply, or None when the response was streamed (SSE)."""
        offsets = request.query_all("offset")
        if len(offsets) > 1:
            raise bad_request("Repeated offset parameter")
        raw_offset = offsets[0] if offsets else None
        live = request.query_one("live")
        if live is not None and live not in ("long-poll", "sse"):
            raise bad_request("Invalid live mode", "use long-poll or sse")
        if live is not None and raw_offset is None:
            raise bad_request("Live reads need an offset")
        after: EntryId | None
        if raw_offset is None or raw_offset == START:
            after = ZERO_ID
        elif raw_offset == NOW:
            after = None  # resolved to the tail below
        else:
            try:
                after = parse_offset(raw_offset)
            except BadOffset:
                raise bad_request("Invalid offset", raw_offset[:100]) from None

        if live is not None:
            self._admit_live()
            async with live_slot(request):  # DSGW_RATE_LIVE_CONNECTIONS, when set
                if live == "sse":
                    await self.sse(request, name, after, send, extra)
                    return None
                return await self.long_poll(request, name, after)

        result = await self._read(name, after, touch=True)
        if after is None:
            return self._now_reply(result)
        return self._data_reply(result, raw_offset or START, None, request.header(b"if-none-match"))

    def _admit_live(self) -> None:
        if self.live_connections >= self.settings.max_live_connections:
            metrics.LIVE_REFUSED.inc()
            raise ProblemError(
                503, "Too many live readers", "on this replica; retry shortly", headers={"retry-after": "1"}
            )

    async def _read(self, name: str, after: EntryId | None, *, touch: bool) -> ReadResult:
        """Read after `after`; None means 'from the tail' (offset=now)."""
        s = self.settings
        return await self.gw.store.read(
            name, after, touch=touch, max_bytes=s.read_chunk_bytes, max_entries=s.read_chunk_entries
        )

    async def _live_read(self, name: str, after: EntryId, version: int) -> ReadResult:
        """A live reader's re-read. Readers of one stream woken together mostly
        wait at the same offset: they share one Redis read (single flight), so a
        wake costs one read per replica, not one per reader. `version` is the
        notification the reader has seen: it only shares a read started after
        that notification, which therefore sees the append behind it."""
        key = (name, after, version)
        pending = self._reads_in_flight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._read(name, after, touch=False))
            self._reads_in_flight[key] = pending
            pending.add_done_callback(lambda _: self._reads_in_flight.pop(key, None))
        # shield: one reader going away must not cancel the read for the others.
        return await asyncio.shield(pending)

    def _now_reply(self, result: ReadResult) -> Reply:
        meta = result.meta
        headers = [
            (b"content-type", meta.content_type.encode("latin-1")),
            (b"stream-next-offset", meta.tail_offset.encode()),
            (b"stream-up-to-date", b"true"),
            (b"cache-control", b"no-store"),
        ]
        if meta.closed:
            headers.append((b"stream-closed", b"true"))
        return Reply(200, headers, b"[]" if meta.json else b"")

    def _data_reply(
        self, result: ReadResult, start: str, cursor: str | None, if_none_match: str | None = None
    ) -> Reply:
        meta = result.meta
        next_offset = result.next_offset
        closed = result.closed_at_end
        etag = f'"{meta.gen}:{start}:{next_offset}{":c" if closed else ""}"'
        headers = [
            (b"content-type", meta.content_type.encode("latin-1")),
            (b"stream-next-offset", next_offset.encode()),
            (b"etag", etag.encode("latin-1")),
        ]
        if result.up_to_date:
            headers.append((b"stream-up-to-date", b"true"))
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"cache-control", _CACHE_HISTORICAL))
        if closed:
            headers.append((b"stream-closed", b"true"))
        if cursor is not None:
            headers.append((b"stream-cursor", cursor.encode()))
        if etag_matches(if_none_match, etag):
            return Reply(304, headers)
        body = b"[" + result.body + b"]" if meta.json else result.body
        return Reply(200, headers, body)

    # --- long-poll -------------------------------------------------------------------

    async def long_poll(self, request: StreamRequest, name: str, after: EntryId | None) -> Reply:
        cursor = next_cursor(request.query_one("cursor"))
        start = request.query_one("offset") or START
        result = await self._read(name, after, touch=True)
        if after is None:
            after = result.meta.tail
            result = ReadResult(result.meta, b"", 0, after)
        elif result.count:
            return self._data_reply(result, start, cursor)
        if result.closed_at_end:
            return self._timeout_reply(result, None)

        deadline = time.monotonic() + self.settings.long_poll_timeout_ms / 1000
        # A long-poll never outlives the token it was authorised with.
        deadline = min(deadline, request.scope.get(SCOPE_DEADLINE, deadline))
        self.live_connections += 1
        metrics.LIVE_READERS_LONG_POLL.inc()
        try:
            async with self.gw.hub.watch(stream_keys(name).channel) as watch:
                departure = asyncio.ensure_future(_watch_departure(request.receive, watch))
                try:
                    await watch.subscribed()
                    while True:
                        # Re-read once the watch is in place: an append between the
                        # first read and the watch would otherwise go unnoticed.
                        try:
                            read_version = watch.version
                            result = await self._live_read(name, after, read_version)
                        except RedisError:
                            # Redis away for a moment (restart, failover): keep the
                            # reader waiting and try again, up to its deadline.
                            if time.monotonic() >= deadline:
                                raise
                            await asyncio.sleep(0.2)
                            continue
                        if result.count:
                            if watch.notified_at:
                                metrics.BATCHED.observe(
                                    metrics.FANOUT_DELAY, time.monotonic() - watch.notified_at
                                )
                            return self._data_reply(result, start, cursor)
                        if result.closed_at_end:
                            return self._timeout_reply(result, None)
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or self.gw.draining or watch.interrupted:
                            return self._timeout_reply(result, cursor)
                        await watch.wait(remaining)
                        pushed = _pushed_read(result, watch.pushed_since(read_version))
                        if pushed is not None:
                            # The one append since our read came with its data.
                            metrics.BATCHED.inc(metrics.PUSHED_READS)
                            return self._data_reply(pushed, start, cursor)
                finally:
                    departure.cancel()
        finally:
            self.live_connections -= 1
            metrics.LIVE_READERS_LONG_POLL.dec()

    @staticmethod
    def _timeout_reply(result: ReadResult, cursor: str | None) -> Reply:
        headers = [
            (b"stream-next-offset", result.next_offset.encode()),
            (b"stream-up-to-date", b"true"),
            (b"cache-control", b"no-store"),
        ]
        if result.closed_at_end:
            headers.append((b"stream-closed", b"true"))
        elif cursor is not None:
            headers.append((b"stream-cursor", cursor.encode()))
        return Reply(204, headers)

    # --- SSE ---------------------------------------------------------------------------

    async def sse(
        self, request: StreamRequest, name: str, after: EntryId | None, send: Send, extra: Headers
    ) -> None:
        first = await self._read(name, after, touch=True)  # 404 etc. before the stream starts
        meta = first.meta
        if after is None:
            first = ReadResult(meta, b"", 0, meta.tail)
        binary = sse_needs_base64(meta.media_type)
        headers = _SSE_HEADERS + extra
        if binary:
            headers = headers + [(b"stream-sse-data-encoding", b"base64")]
        self.live_connections += 1
        metrics.LIVE_READERS_SSE.inc()
        task = asyncio.current_task()
        assert task is not None
        try:
            async with self.gw.hub.watch(stream_keys(name).channel) as watch:
                departure = asyncio.ensure_future(_watch_departure(request.receive, watch))
                try:
                    await self._send(
                        task, send, {"type": "http.response.start", "status": 200, "headers": headers}
                    )
                    cursor_in = request.query_one("cursor")
                    token_end = request.scope.get(SCOPE_DEADLINE)
                    writer = DirectWriter.of(send)
                    events = self._sse_events(name, first, binary, cursor_in, watch, writer, token_end)
                    async for chunk in events:
                        await self._send(
                            task, send, {"type": "http.response.body", "body": chunk, "more_body": True}
                        )
                    if not watch.interrupted:
                        await self._send(task, send, {"type": "http.response.body", "body": b""})
                except asyncio.CancelledError:
                    if task not in self._cut:
                        raise
                    self._cut.discard(task)
                    task.uncancel()
                    metrics.SSE_CUT_OFF.inc()
                    log.info("slow SSE reader cut off", extra={"fields": {"stream": name}})
                    abort_connection(send)
                finally:
                    departure.cancel()
        finally:
            self._blocked_sends.pop(task, None)
            self.live_connections -= 1
            metrics.LIVE_READERS_SSE.dec()

    async def _send(self, task: asyncio.Task[None], send: Send, message: dict) -> None:
        """Send, registered as blocked meanwhile: uvicorn's send only waits when
        the client does not take data (flow control), and then the sweeper
        may cut the connection."""
        self._blocked_sends[task] = time.monotonic()
        try:
            await send(message)
        finally:
            self._blocked_sends.pop(task, None)

    def start_sweeper(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep_slow_readers())

    def stop_sweeper(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    async def _sweep_slow_readers(self) -> None:
        limit = self.settings.sse_send_timeout_ms / 1000
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for task, since in list(self._blocked_sends.items()):
                if now - since > limit and task not in self._cut:
                    self._cut.add(task)
                    task.cancel()

    async def _sse_events(
        self,
        name: str,
        first: ReadResult,
        binary: bool,
        cursor_in: str | None,
        watch: Watch,
        writer: DirectWriter | None,
        token_end: float | None = None,
    ):  # type: ignore[no-untyped-def]
        s = self.settings
        lifetime_end = time.monotonic() + s.sse_max_lifetime_ms / 1000
        if token_end is not None:
            lifetime_end = min(lifetime_end, token_end)
        keepalive_s = s.sse_keepalive_ms / 1000
        cursor = next_cursor(cursor_in)
        result = first
        since_event = time.monotonic()
        watching_since_first_read = False
        while True:
            after = result.next_id
            closed = result.closed_at_end
            if result.count and result is not first and watch.notified_at:
                metrics.BATCHED.observe(metrics.FANOUT_DELAY, time.monotonic() - watch.notified_at)
            if result.count or result is first or closed:
                # Data and its control go out as one write: a reader that
                # stops at the first complete event still sees both.
                yield _sse_event(result, binary, cursor, closed)
                since_event = time.monotonic()
            if closed:
                return
            if token_end is not None and time.monotonic() >= token_end:
                # The token expired: say where to resume (with a new token), then end.
                yield sse.control_event(
                    result.next_offset, cursor=cursor, up_to_date=result.up_to_date, closed=False
                )
                return
            if result.up_to_date and not watching_since_first_read:
                # The first read came before the watch: read once more now
                # that no notification can slip by (the first event is out
                # already, so a new subscription does not delay it).
                watching_since_first_read = True
                await watch.subscribed()
            elif result.up_to_date:
                now = time.monotonic()
                if now >= lifetime_end or self.gw.draining or watch.interrupted:
                    return
                timeout_s = min(lifetime_end - now, keepalive_s)
                if writer is not None and not watch.pending:
                    # Rest at the tail: the stream's pump writes what comes next
                    # straight to this reader's socket and moves `after` on;
                    # this task only wakes for what the pump leaves to it.
                    parked = ParkedReader(
                        writer,
                        after,
                        (binary, cursor),
                        asyncio.get_running_loop().create_future(),
                        since_event,
                    )
                    await self.fanout.rest(name, watch, parked, timeout_s)
                    after, since_event = parked.after, parked.last_write
                    watch.seen_all()
                    changed = False
                else:
                    changed = await watch.wait(timeout_s)
                if self.gw.draining or watch.interrupted:
                    return
                if not changed and time.monotonic() - since_event >= keepalive_s:
                    current = next_cursor(None)
                    if int(current) > int(cursor):
                        cursor = current
                    yield sse.control_event(
                        format_offset(after), cursor=cursor, up_to_date=True, closed=False
                    )
                    since_event = time.monotonic()
            try:
                result = await self._live_read(name, after, watch.version)
            except ProblemError as exc:
                if exc.status >= 500:
                    # The history database away during catch-up below the trim
                    # point: like Redis away, say where to resume.
                    yield sse.control_event(
                        format_offset(after), cursor=cursor, up_to_date=False, closed=False
                    )
                return  # deleted or expired while we watched: the client learns it on resume
            except RedisError as exc:
                # Redis away (restart, failover): tell the client where to resume
                # before ending, instead of ending silently.
                log.warning("SSE read failed: %s: %s", type(exc).__name__, exc)
                yield sse.control_event(format_offset(after), cursor=cursor, up_to_date=False, closed=False)
                return


def _pushed_read(last: ReadResult, pushed: bytes | None) -> ReadResult | None:
    """What a read after `last` returns, from the notification of the one
    append made since (gateway/lua/append.lua: "tail\nprevious tail\ngen\n
    count\nbody"), if that append came right after `last` in the same stream."""
    if pushed is None:
        return None
    tail, previous, gen, count, body = pushed.split(b"\n", 4)
    meta = last.meta
    if parse_entry_id(previous) != last.next_id or gen.decode() != meta.gen or count == b"0":
        return None
    tail_id = parse_entry_id(tail)
    return ReadResult(dataclasses.replace(meta, tail=tail_id), body, int(count), tail_id)


def _sse_event(result: ReadResult, binary: bool, cursor: str, closed: bool) -> bytes:
    """A read's data event and its control event. Readers woken together share
    one read (single flight): the event is framed once per read and cursor,
    not once per reader."""
    key = (binary, cursor, closed)
    frames = result.frames
    if frames is None:
        frames = result.frames = {}
    event = frames.get(key)
    if event is None:
        data = sse.data_event(result.body, json_mode=result.meta.json, binary=binary) if result.count else b""
        control = sse.control_event(
            result.next_offset, cursor=cursor, up_to_date=result.up_to_date, closed=closed
        )
        event = frames[key] = data + control
    return event


async def _watch_departure(receive: Receive, watch: Watch) -> None:
    """Interrupt the watch when the client disconnects (a GET has no body, so
    the next message after the empty request is the disconnect)."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
        watch.interrupt()
