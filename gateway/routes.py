"""HTTP handlers for /v1/stream/{name}: the Durable Streams protocol on top of
the Store. Plain Starlette endpoints: the hot paths skip FastAPI's dependency
and validation machinery."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from . import metrics, sse
from .keys import stream_keys
from .offsets import ZERO_ID, BadOffset, EntryId, format_offset, parse_offset
from .protocol import (
    DEFAULT_CONTENT_TYPE,
    ProblemError,
    bad_request,
    checked_content_type,
    is_json,
    media_type,
    next_cursor,
    parse_expires_at,
    parse_producer,
    parse_stream_closed,
    parse_sub_offset,
    parse_ttl,
    split_json_messages,
    sse_needs_base64,
)
from .store import ForkRequest, ReadResult, WriteOutcome

if TYPE_CHECKING:
    from .app import Gateway

STREAM_PREFIX = "/v1/stream/"
RESERVED_ROOT = "__ds"
MAX_NAME_BYTES = 1024

START = "-1"
NOW = "now"

_CACHE_HISTORICAL = "public, max-age=60, stale-while-revalidate=300"


def problem(status: int, title: str, detail: str = "", headers: dict[str, str] | None = None) -> Response:
    body = b'{"type":"about:blank","status":%d,"title":%s' % (status, _json_str(title))
    if detail:
        body += b',"detail":' + _json_str(detail)
    body += b"}"
    all_headers = {"content-type": "application/problem+json"}
    if headers:
        all_headers.update(headers)
    return Response(body, status, headers=all_headers)


def _json_str(text: str) -> bytes:
    return json.dumps(text).encode()


class StreamRoutes:
    """The handlers of one gateway process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self._reads_in_flight: dict[tuple[str, EntryId, int], asyncio.Future[ReadResult]] = {}

    async def endpoint(self, request: Request) -> Response:
        method = request.method
        try:
            name = self._stream_name(request.path_params["name"])
            if method == "GET":
                response = await self.get(request, name)
            elif method == "POST":
                response = await self.post(request, name)
            elif method == "PUT":
                response = await self.put(request, name)
            elif method == "HEAD":
                response = await self.head(name)
            elif method == "DELETE":
                await self.gw.store.delete(name)
                response = Response(status_code=204)
            else:
                response = problem(
                    405, "Method not allowed", headers={"allow": "GET, HEAD, PUT, POST, DELETE, OPTIONS"}
                )
        except ProblemError as exc:
            response = problem(exc.status, exc.title, exc.detail, exc.headers)
        metrics.RESPONSES.labels(method, str(response.status_code)).inc()
        return response

    def _stream_name(self, raw: str) -> str:
        if not raw:
            raise ProblemError(404, "No stream name")
        if len(raw.encode()) > MAX_NAME_BYTES:
            raise bad_request("Stream name too long", f"at most {MAX_NAME_BYTES} bytes")
        if raw == RESERVED_ROOT or raw.startswith(RESERVED_ROOT + "/"):
            raise ProblemError(404, "Reserved path", "/__ds is reserved for the protocol's own APIs")
        if any(ord(c) < 0x20 or c == "\x7f" for c in raw):
            raise bad_request("Invalid stream name", "control characters are not allowed")
        return raw

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ProblemError(413, "Body too large", f"at most {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProblemError(413, "Body too large", f"at most {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # --- PUT: create or fork ---------------------------------------------------

    async def put(self, request: Request, name: str) -> Response:
        h = request.headers
        content_type = checked_content_type(h.get("content-type"))
        ttl = parse_ttl(h.get("stream-ttl"))
        expires_at = parse_expires_at(h.get("stream-expires-at"))
        if ttl is not None and expires_at is not None:
            raise bad_request("Stream-TTL and Stream-Expires-At are exclusive")
        closed = parse_stream_closed(h.get("stream-closed"))
        fork = self._fork_request(
            h.get("stream-forked-from"), h.get("stream-fork-offset"), h.get("stream-fork-sub-offset")
        )
        body = await self._body(request)

        store = self.gw.store
        if fork is None:
            content_type = content_type or DEFAULT_CONTENT_TYPE
            media = media_type(content_type)
        elif content_type:
            media = media_type(content_type)
        else:
            # The fork inherits the source's content type; its body follows that mode.
            media = await store.media_type_of(fork.source) if body else ""
        messages: list[bytes] | list[str] | None = None
        if body:
            if is_json(media):
                messages = split_json_messages(
                    body, allow_empty=True, max_messages=self.settings.max_append_messages
                )
            else:
                messages = [body]
        outcome = await store.create(
            name,
            content_type=content_type or "",
            media_type=media,
            ttl=ttl,
            expires_at=expires_at,
            closed=closed,
            body=messages,
            fork=fork,
        )
        headers = {
            "content-type": outcome.content_type,
            "stream-next-offset": format_offset(outcome.tail),
        }
        if outcome.closed:
            headers["stream-closed"] = "true"
        if outcome.created:
            # Percent-encoded: a header holds Latin-1 at most, a name any Unicode.
            url = request.url
            headers["location"] = f"{url.scheme}://{url.netloc}{quote(request.scope['path'])}"
            return Response(status_code=201, headers=headers)
        return Response(status_code=200, headers=headers)

    def _fork_request(
        self, forked_from: str | None, offset: str | None, sub: str | None
    ) -> ForkRequest | None:
        sub_offset = parse_sub_offset(sub)
        if forked_from is None:
            if sub_offset is not None:
                raise bad_request("Stream-Fork-Sub-Offset needs Stream-Forked-From")
            if offset is not None:
                raise bad_request("Stream-Fork-Offset needs Stream-Forked-From")
            return None
        path = urlsplit(forked_from.strip()).path
        if not path.startswith(STREAM_PREFIX) or len(path) == len(STREAM_PREFIX):
            raise bad_request("Invalid Stream-Forked-From", f"expected a path under {STREAM_PREFIX}")
        source = self._stream_name(unquote(path[len(STREAM_PREFIX) :]))
        fork_offset: EntryId | None = None
        if offset is not None:
            try:
                fork_offset = parse_offset(offset)
            except BadOffset:
                raise bad_request("Invalid Stream-Fork-Offset", offset[:100]) from None
        return ForkRequest(source, fork_offset, sub_offset or 0)

    # --- POST: append or close -------------------------------------------------

    async def post(self, request: Request, name: str) -> Response:
        h = request.headers
        producer = parse_producer(h.get("producer-id"), h.get("producer-epoch"), h.get("producer-seq"))
        close = parse_stream_closed(h.get("stream-closed"))
        body = await self._body(request)
        store = self.gw.store
        if not body:
            if not close:
                raise bad_request("Empty body", "an append needs data; close with Stream-Closed: true")
            return self._write_response(await store.close(name, producer), producer, close_only=True)

        content_type = checked_content_type(h.get("content-type"))
        if content_type is None:
            raise bad_request("Content-Type required")
        media = media_type(content_type)
        stream_seq = h.get("stream-seq")
        if stream_seq is not None and stream_seq == "":
            raise bad_request("Empty Stream-Seq")
        if is_json(media):
            try:
                messages: list[bytes] | list[str] = split_json_messages(
                    body, allow_empty=False, max_messages=self.settings.max_append_messages
                )
            except ProblemError:
                # Missing, closed or mismatched streams take precedence over bad JSON.
                await self._check_appendable(name, media)
                raise
        else:
            messages = [body]
        outcome = await store.append(
            name, media, messages, close=close, stream_seq=stream_seq, producer=producer
        )
        if outcome.status == "ok":
            metrics.APPENDS.labels(media).inc()
            metrics.APPEND_BYTES.labels(media).inc(len(body))
        return self._write_response(outcome, producer, close_only=False)

    async def _check_appendable(self, name: str, media: str) -> None:
        result = await self.gw.store.read(name, None, touch=False, max_bytes=0, max_entries=0)
        if result.meta.closed:
            raise ProblemError(409, "Stream is closed", headers=self._closed_headers(result.meta.tail_offset))
        if result.meta.media_type != media:
            raise ProblemError(409, "Content-Type does not match the stream")

    @staticmethod
    def _closed_headers(tail_offset: str) -> dict[str, str]:
        return {"stream-closed": "true", "stream-next-offset": tail_offset}

    def _write_response(
        self, outcome: WriteOutcome, producer: tuple[str, int, int] | None, *, close_only: bool
    ) -> Response:
        status = outcome.status
        headers = {"stream-next-offset": outcome.tail_offset}
        if outcome.closed or (close_only and status == "ok"):
            headers["stream-closed"] = "true"
        if producer is not None:
            headers["producer-epoch"] = str(producer[1])
            headers["producer-seq"] = str(producer[2])
        if status == "ok":
            return Response(status_code=200 if producer and not close_only else 204, headers=headers)
        if status == "dup":
            metrics.DUPLICATE_APPENDS.inc()
            headers["producer-seq"] = str(outcome.producer_seq)
            return Response(status_code=204, headers=headers)
        if status == "closed_dup":
            return Response(status_code=204, headers=headers)
        if status == "closed":
            raise ProblemError(409, "Stream is closed", headers=self._closed_headers(outcome.tail_offset))
        if status == "ct_mismatch":
            raise ProblemError(409, "Content-Type does not match the stream")
        if status == "stale":
            raise ProblemError(403, "Stale producer epoch", headers={"producer-epoch": outcome.detail})
        if status == "epoch_seq":
            raise bad_request("A new producer epoch must start at Producer-Seq 0")
        if status == "gap":
            assert producer is not None
            raise ProblemError(
                409,
                "Producer sequence gap",
                headers={"producer-expected-seq": outcome.detail, "producer-received-seq": str(producer[2])},
            )
        if status == "seq_conflict":
            raise ProblemError(409, "Stream-Seq must increase")
        raise ProblemError(500, "Unexpected write outcome", status)

    # --- HEAD ------------------------------------------------------------------

    async def head(self, name: str) -> Response:
        result = await self.gw.store.read(name, None, touch=False, max_bytes=0, max_entries=0)
        meta = result.meta
        headers = {
            "content-type": meta.content_type,
            "stream-next-offset": meta.tail_offset,
            "cache-control": "no-store",
        }
        if meta.ttl is not None:
            headers["stream-ttl"] = str(meta.ttl)
        if meta.expires_at:
            headers["stream-expires-at"] = meta.expires_at
        if meta.closed:
            headers["stream-closed"] = "true"
        return Response(status_code=200, headers=headers)

    # --- GET: catch-up, long-poll, SSE ------------------------------------------

    async def get(self, request: Request, name: str) -> Response:
        query = request.query_params
        offsets = query.getlist("offset")
        if len(offsets) > 1:
            raise bad_request("Repeated offset parameter")
        raw_offset = offsets[0] if offsets else None
        live = query.get("live")
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

        if live == "sse":
            return await self.sse(request, name, after)
        if live == "long-poll":
            return await self.long_poll(request, name, after)

        result = await self._read(name, after, touch=True)
        if after is None:
            return self._now_response(result)
        return self._data_response(request, result, raw_offset or START, cursor=None)

    async def _read(self, name: str, after: EntryId | None, *, touch: bool) -> ReadResult:
        """Read after `after`; None means 'from the tail' (offset=now)."""
        store = self.gw.store
        s = self.settings
        result = await store.read(
            name, after, touch=touch, max_bytes=s.read_chunk_bytes, max_entries=s.read_chunk_entries
        )
        return result

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

    def _now_response(self, result: ReadResult) -> Response:
        meta = result.meta
        headers = {
            "content-type": meta.content_type,
            "stream-next-offset": meta.tail_offset,
            "stream-up-to-date": "true",
            "cache-control": "no-store",
        }
        if meta.closed:
            headers["stream-closed"] = "true"
        return Response(b"[]" if meta.json else b"", 200, headers=headers)

    def _data_response(
        self, request: Request | None, result: ReadResult, start: str, *, cursor: str | None
    ) -> Response:
        meta = result.meta
        payloads = [e.payload for e in result.entries]
        body = b"[" + b",".join(payloads) + b"]" if meta.json else b"".join(payloads)
        next_offset = result.next_offset
        closed = result.closed_at_end
        etag = f'"{meta.gen}:{start}:{next_offset}{":c" if closed else ""}"'
        headers = {
            "content-type": meta.content_type,
            "stream-next-offset": next_offset,
            "etag": etag,
        }
        if result.up_to_date:
            headers["stream-up-to-date"] = "true"
            headers["cache-control"] = "no-cache"
        else:
            headers["cache-control"] = _CACHE_HISTORICAL
        if closed:
            headers["stream-closed"] = "true"
        if cursor is not None:
            headers["stream-cursor"] = cursor
        if request is not None and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, 200, headers=headers)

    async def long_poll(self, request: Request, name: str, after: EntryId | None) -> Response:
        cursor = next_cursor(request.query_params.get("cursor"))
        start = request.query_params["offset"]
        result = await self._read(name, after, touch=True)
        if after is None:
            after = result.meta.tail
            result = ReadResult(result.meta, [], after)
        elif result.entries:
            return self._data_response(None, result, start, cursor=cursor)
        if result.closed_at_end:
            return self._timeout_response(result, None)

        deadline = time.monotonic() + self.settings.long_poll_timeout_ms / 1000
        keys = stream_keys(name)
        metrics.LIVE_READERS.labels("long-poll").inc()
        try:
            async with self.gw.hub.watch(keys.channel) as watch:
                while True:
                    # Re-read once the watch is in place: an append between the
                    # first read and the watch would otherwise go unnoticed.
                    try:
                        result = await self._live_read(name, after, watch.version)
                    except RedisError:
                        # Redis away for a moment (restart, failover): keep the
                        # reader waiting and try again, up to its deadline.
                        if time.monotonic() >= deadline:
                            raise
                        await asyncio.sleep(0.2)
                        continue
                    if result.entries:
                        if watch.notified_at:
                            metrics.FANOUT_DELAY.observe(time.monotonic() - watch.notified_at)
                        return self._data_response(None, result, start, cursor=cursor)
                    if result.closed_at_end:
                        return self._timeout_response(result, None)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.gw.draining:
                        return self._timeout_response(result, cursor)
                    await watch.wait(remaining)
        finally:
            metrics.LIVE_READERS.labels("long-poll").dec()

    @staticmethod
    def _timeout_response(result: ReadResult, cursor: str | None) -> Response:
        headers = {
            "stream-next-offset": result.next_offset,
            "stream-up-to-date": "true",
        }
        if result.closed_at_end:
            headers["stream-closed"] = "true"
        elif cursor is not None:
            headers["stream-cursor"] = cursor
        return Response(status_code=204, headers=headers)

    async def sse(self, request: Request, name: str, after: EntryId | None) -> Response:
        first = await self._read(name, after, touch=True)
        meta = first.meta
        if after is None:
            after = meta.tail
            first = ReadResult(meta, [], after)
        binary = sse_needs_base64(meta.media_type)
        headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
        }
        if binary:
            headers["stream-sse-data-encoding"] = "base64"
        cursor_in = request.query_params.get("cursor")
        events = self._sse_events(name, first, after, binary, cursor_in)
        return EventSourceResponse(events, headers=headers, ping=3600, media_type="text/event-stream")

    async def _sse_events(self, name, first: ReadResult, after: EntryId, binary: bool, cursor_in):
        s = self.settings
        lifetime_end = time.monotonic() + s.sse_max_lifetime_ms / 1000
        keepalive_s = s.sse_keepalive_ms / 1000
        keys = stream_keys(name)
        cursor = next_cursor(cursor_in)
        metrics.LIVE_READERS.labels("sse").inc()
        try:
            async with self.gw.hub.watch(keys.channel) as watch:
                result = first
                since_event = time.monotonic()
                watching_since_first_read = False
                while True:
                    after = result.next_id
                    closed = result.closed_at_end
                    if result.entries and result is not first and watch.notified_at:
                        metrics.FANOUT_DELAY.observe(time.monotonic() - watch.notified_at)
                    if result.entries or result is first or closed:
                        # Data and its control go out as one write: a reader that
                        # stops at the first complete event still sees both.
                        chunk = (
                            sse.data_event(
                                [e.payload for e in result.entries], json_mode=result.meta.json, binary=binary
                            )
                            if result.entries
                            else b""
                        )
                        yield chunk + sse.control_event(
                            result.next_offset, cursor=cursor, up_to_date=result.up_to_date, closed=closed
                        )
                        since_event = time.monotonic()
                    if closed:
                        return
                    if result.up_to_date and not watching_since_first_read:
                        # The first read came before the watch: read once more
                        # now that no notification can slip by.
                        watching_since_first_read = True
                    elif result.up_to_date:
                        now = time.monotonic()
                        if now >= lifetime_end or self.gw.draining:
                            return
                        changed = await watch.wait(min(lifetime_end - now, keepalive_s))
                        if self.gw.draining:
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
                    except (ProblemError, RedisError):
                        # Deleted or expired while we watched, or Redis is away:
                        # end cleanly; the client resumes from its last offset.
                        return
        finally:
            metrics.LIVE_READERS.labels("sse").dec()
