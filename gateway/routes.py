"""HTTP handlers for /v1/stream/{name}: the Durable Streams protocol on top of
the Store, as lean ASGI (gateway/http.py). Writes live here; reads (catch-up,
long-poll, SSE) in gateway/reads.py."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from starlette.types import Send

from . import auth, metrics
from .http import Headers, Reply, StreamRequest, reply_from
from .json_messages import split_json_messages
from .offsets import BadOffset, EntryId, format_offset, parse_offset
from .protocol import (
    DEFAULT_CONTENT_TYPE,
    ProblemError,
    bad_request,
    checked_content_type,
    is_json,
    media_type,
    parse_expires_at,
    parse_producer,
    parse_stream_closed,
    parse_sub_offset,
    parse_ttl,
)
from .ratelimit import request_guard
from .reads import StreamReads
from .store_model import ForkRequest, WriteOutcome

if TYPE_CHECKING:
    from .app import Gateway

STREAM_PREFIX = "/v1/stream/"
RESERVED_ROOT = "__ds"
MAX_NAME_BYTES = 1024
ALLOW = "GET, HEAD, PUT, POST, DELETE, OPTIONS"
# Methods whose body, if a client sends one, is read and dropped (http.py discard_body).
TAKES_NO_BODY = frozenset(("GET", "HEAD", "DELETE"))

Producer = tuple[str, int, int]


def stream_name(raw: str) -> str:
    """A stream name from the path, checked."""
    if not raw:
        raise ProblemError(404, "No stream name")
    if len(raw.encode()) > MAX_NAME_BYTES:
        raise bad_request("Stream name too long", f"at most {MAX_NAME_BYTES} bytes")
    if raw == RESERVED_ROOT or raw.startswith(RESERVED_ROOT + "/"):
        raise ProblemError(404, "Reserved path", "/__ds is reserved for the protocol's own APIs")
    if not raw.isprintable() and any(ord(c) < 0x20 or c == "\x7f" for c in raw):
        raise bad_request("Invalid stream name", "control characters are not allowed")
    return raw


class StreamRoutes:
    """The stream handlers of one gateway process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.reads = StreamReads(gateway)
        # Authentication and rate limits (gateway/ratelimit.py); None when off.
        self.guard = request_guard(gateway)

    async def handle(self, request: StreamRequest, send: Send, extra: Headers) -> int:
        """Answer one request; returns the status sent."""
        method = request.method
        # A body on GET, HEAD or DELETE is read and dropped (after the guard,
        # which refuses with a short answer): see StreamRequest.discard_body.
        unread = method in TAKES_NO_BODY and request.declares_body()
        # The protocol's control APIs (__ds/...) come before any stream name.
        name = request.name
        try:
            if self.gw.subscriptions is not None and (
                name == RESERVED_ROOT or name.startswith(RESERVED_ROOT + "/")
            ):
                if unread:  # (they check their own credentials, per subscription)
                    await request.discard_body(self.settings.max_body_bytes)
                return await self.gw.subscriptions.routes.handle(request, send, extra)
            name = stream_name(name)
            if self.guard is not None:
                await self.guard(request, name)
            if unread:
                await request.discard_body(self.settings.max_body_bytes)
            if method == "POST":
                reply = await self.post(request, name)
            elif method == "GET":
                streamed = await self.reads.get(request, name, send, extra)
                if streamed is None:  # SSE: already answered
                    return 200
                reply = streamed
            elif method == "PUT":
                reply = await self.put(request, name)
            elif method == "HEAD":
                reply = await self.reads.head(name)
            elif method == "DELETE":
                await self.gw.store.delete(name)
                reply = Reply(204)
            else:
                raise ProblemError(405, "Method not allowed", headers={"allow": ALLOW})
        except ProblemError as exc:
            reply = reply_from(exc)
        await reply.send(send, extra)
        return reply.status

    # --- PUT: create or fork ---------------------------------------------------

    async def put(self, request: StreamRequest, name: str) -> Reply:
        h = request.header
        content_type = checked_content_type(h(b"content-type"))
        ttl = parse_ttl(h(b"stream-ttl"))
        expires_at = parse_expires_at(h(b"stream-expires-at"))
        if ttl is not None and expires_at is not None:
            raise bad_request("Stream-TTL and Stream-Expires-At are exclusive")
        closed = parse_stream_closed(h(b"stream-closed"))
        fork = self._fork_request(
            h(b"stream-forked-from"), h(b"stream-fork-offset"), h(b"stream-fork-sub-offset")
        )
        if fork is not None:
            auth.require(request, "read", fork.source)  # a fork reads its source
        body = await request.body(self.settings.max_body_bytes)

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
        headers = [
            (b"content-type", outcome.content_type.encode("latin-1")),
            (b"stream-next-offset", format_offset(outcome.tail).encode()),
        ]
        if outcome.closed:
            headers.append((b"stream-closed", b"true"))
        if not outcome.created:
            return Reply(200, headers)
        # Percent-encoded: a header holds Latin-1 at most, a name any Unicode.
        scheme = request.scope.get("scheme", "http")
        host = request.header(b"host") or "localhost"
        headers.append((b"location", f"{scheme}://{host}{quote(request.scope['path'])}".encode("latin-1")))
        return Reply(201, headers)

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
        source = stream_name(unquote(path[len(STREAM_PREFIX) :]))
        fork_offset: EntryId | None = None
        if offset is not None:
            try:
                fork_offset = parse_offset(offset)
            except BadOffset:
                raise bad_request("Invalid Stream-Fork-Offset", offset[:100]) from None
        return ForkRequest(source, fork_offset, sub_offset or 0)

    # --- POST: append or close -------------------------------------------------

    async def post(self, request: StreamRequest, name: str) -> Reply:
        h = request.header
        producer = parse_producer(h(b"producer-id"), h(b"producer-epoch"), h(b"producer-seq"))
        if producer is not None and len(producer[0].encode()) > self.settings.max_producer_id_bytes:
            raise bad_request("Producer-Id too long", f"at most {self.settings.max_producer_id_bytes} bytes")
        close = parse_stream_closed(h(b"stream-closed"))
        body = await request.body(self.settings.max_body_bytes)
        store = self.gw.store
        if not body:
            if not close:
                raise bad_request("Empty body", "an append needs data; close with Stream-Closed: true")
            return self._write_reply(await store.close(name, producer), producer, close_only=True)

        content_type = checked_content_type(h(b"content-type"))
        if content_type is None:
            raise bad_request(
                "Content-Type required", "send the stream's content type, e.g. application/json"
            )
        media = media_type(content_type)
        stream_seq = h(b"stream-seq")
        if stream_seq == "":
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
            metrics.count_append(media, len(body))
        return self._write_reply(outcome, producer, close_only=False)

    async def _check_appendable(self, name: str, media: str) -> None:
        result = await self.gw.store.read(name, None, touch=False, max_bytes=0, max_entries=0)
        if result.meta.closed:
            raise ProblemError(409, "Stream is closed", headers=_closed_headers(result.meta.tail_offset))
        if result.meta.media_type != media:
            raise _content_type_mismatch(result.meta.content_type)

    def _write_reply(self, outcome: WriteOutcome, producer: Producer | None, *, close_only: bool) -> Reply:
        status = outcome.status
        headers = [(b"stream-next-offset", outcome.tail_offset.encode())]
        if outcome.closed or (close_only and status == "ok"):
            headers.append((b"stream-closed", b"true"))
        if producer is not None:
            headers.append((b"producer-epoch", b"%d" % producer[1]))
            headers.append((b"producer-seq", b"%d" % producer[2]))
        if status == "ok":
            return Reply(200 if producer and not close_only else 204, headers)
        if status == "dup":
            metrics.BATCHED.inc(metrics.DUPLICATE_APPENDS)
            headers[-1] = (b"producer-seq", b"%d" % (outcome.producer_seq or 0))
            return Reply(204, headers)
        if status == "closed_dup":
            return Reply(204, headers)
        if status == "closed":
            raise ProblemError(409, "Stream is closed", headers=_closed_headers(outcome.tail_offset))
        if status == "ct_mismatch":
            raise _content_type_mismatch(outcome.detail)
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


def _closed_headers(tail_offset: str) -> dict[str, str]:
    return {"stream-closed": "true", "stream-next-offset": tail_offset}


def _content_type_mismatch(stream_content_type: str) -> ProblemError:
    detail = f"this stream takes {stream_content_type}" if stream_content_type else ""
    return ProblemError(409, "Content-Type does not match the stream", detail)
