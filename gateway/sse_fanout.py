"""SSE fan-out without a task switch per reader: readers at their stream's tail
are *parked* here, and each new read is written straight to their sockets.

A live SSE reader used to wake up for every message, take the shared read,
frame it and hand it to the server's `send`: with a thousand readers on one
stream that is a thousand task switches and coroutine chains per message,
about two thirds of the CPU a delivered event cost. Here one pump per stream
makes the read once and writes the framed event to every parked reader's
transport in one loop. A reader's own task sleeps meanwhile and only wakes for
what the pump leaves to it: keep-alives, its lifetime or token end, a close of
the stream, a read that did not reach the tail, a reader whose socket is not
taking data (the task's own send has flow control and the slow-reader cut-off),
or a failed read.

Direct writes need uvicorn's httptools protocol, whose ASGI `send` is a bound
method of the connection's request cycle (transport, chunked encoding, flow
control state). With any other server `DirectWriter.of` returns None and the
reader keeps waking up for every message as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Send

from . import metrics
from .live import Watch
from .offsets import EntryId
from .store_model import ReadResult

log = logging.getLogger("dsgw.sse")

# Only uvicorn's httptools cycle frames chunks the way we write them here
# (h11's keeps its own state about the body).
_DIRECT_CYCLE = "uvicorn.protocols.http.httptools_impl"


class DirectWriter:
    """Writes body chunks of a started, chunked HTTP/1.1 response straight to
    the connection's transport, as uvicorn's own `send` would."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @classmethod
    def of(cls, send: Send) -> DirectWriter | None:
        cycle = getattr(send, "__self__", None)
        if cycle is None or type(cycle).__module__ != _DIRECT_CYCLE:
            return None
        if cycle.chunked_encoding is not True or not cycle.response_started:
            return None
        return cls(cycle)

    def write(self, chunk: bytes) -> bool:
        """Write one chunk-framed piece of body; False (nothing written) when
        the connection is gone or not taking data: then the reader's own task
        must send, with flow control."""
        cycle = self._cycle
        if cycle.disconnected or cycle.response_complete or cycle.flow.write_paused:
            return False
        cycle.transport.write(chunk)
        return True


def chunk(event: bytes) -> bytes:
    """An SSE event as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(event), event)


@dataclass(eq=False)
class ParkedReader:
    """A reader resting at its stream's tail; the pump moves `after` on as it
    writes events to it."""

    writer: DirectWriter
    after: EntryId
    style: tuple[bool, str]  # (base64, cursor): how its events are framed
    wake: asyncio.Future[None]
    last_write: float = 0.0


@dataclass(eq=False)
class _Stream:
    """The parked readers of one stream in this process, by position."""

    name: str
    watch: Watch
    parked: dict[EntryId, set[ParkedReader]] = field(default_factory=dict)
    version: int = 0
    dirty: bool = False
    pump: asyncio.Task[None] | None = None

    @property
    def empty(self) -> bool:
        return not self.parked


class Fanout:
    """Per process: parked SSE readers of every stream, and one pump per stream
    that has any."""

    def __init__(
        self,
        read: Callable[[str, EntryId, int], Awaitable[ReadResult]],
        frame: Callable[[ReadResult, bool, str], bytes],
    ) -> None:
        # read(name, after, version): the shared (single-flight) live read;
        # frame(result, base64, cursor): a read's SSE event (data and control).
        self._read = read
        self._frame = frame
        self._streams: dict[str, _Stream] = {}

    @property
    def parked_count(self) -> int:
        return sum(len(r) for s in self._streams.values() for r in s.parked.values())

    async def rest(self, name: str, watch: Watch, reader: ParkedReader, timeout_s: float) -> None:
        """Park `reader` until the pump hands it back, its watch is
        interrupted, or `timeout_s` passed. The caller made sure its last read
        came after every notification so far (nothing can slip by)."""
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream(name, watch)
            watch.listen(stream, self._notified)
        stream.parked.setdefault(reader.after, set()).add(reader)
        try:
            await watch.rest(reader.wake, timeout_s)
        finally:
            self._unpark(stream, reader)

    def wake_all(self) -> None:
        """Hand every reader back to its task (draining)."""
        for stream in list(self._streams.values()):
            for readers in list(stream.parked.values()):
                for reader in list(readers):
                    _resolve(reader.wake)

    def _unpark(self, stream: _Stream, reader: ParkedReader) -> None:
        readers = stream.parked.get(reader.after)
        if readers is not None:
            readers.discard(reader)
            if not readers:
                del stream.parked[reader.after]
        if stream.empty and stream.pump is None and self._streams.get(stream.name) is stream:
            del self._streams[stream.name]
            stream.watch.unlisten(stream)

    def _notified(self, stream: _Stream, version: int) -> None:
        stream.version = version
        stream.dirty = True
        if stream.pump is None and not stream.empty:
            stream.pump = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: _Stream) -> None:
        try:
            while stream.dirty and not stream.empty:
                stream.dirty = False
                version = stream.version
                for position in list(stream.parked):
                    try:
                        result = await self._read(stream.name, position, version)
                    except Exception:
                        # Each reader's own read reports it (or recovers).
                        self._hand_back(stream, position)
                        continue
                    self._deliver(stream, position, result)
        finally:
            stream.pump = None
            if stream.empty and self._streams.get(stream.name) is stream:
                del self._streams[stream.name]
                stream.watch.unlisten(stream)

    def _deliver(self, stream: _Stream, position: EntryId, result: ReadResult) -> None:
        if result.closed_at_end or not result.up_to_date:
            # The end of the stream (closed, with or without new data), or more
            # to catch up on: the reader's own loop.
            self._hand_back(stream, position)
            return
        if not result.count:
            return  # a notification without new data here (a write elsewhere in the stream's life)
        readers = stream.parked.pop(position, None)
        if not readers:
            return
        now = time.monotonic()
        moved = stream.parked.setdefault(result.next_id, set())
        chunks: dict[tuple[bool, str], bytes] = {}
        written = 0
        for reader in readers:
            framed = chunks.get(reader.style)
            if framed is None:
                framed = chunks[reader.style] = chunk(self._frame(result, *reader.style))
            if reader.writer.write(framed):
                reader.after = result.next_id
                reader.last_write = now
                moved.add(reader)
                written += 1
            else:
                # Parked where it was until its task takes it: the task's own
                # send waits for the socket and cuts off a reader that stalls.
                stream.parked.setdefault(position, set()).add(reader)
                _resolve(reader.wake)
        if not moved:
            del stream.parked[result.next_id]
        if written:
            metrics.BATCHED.inc(metrics.SSE_DIRECT_EVENTS, written)
            if stream.watch.notified_at:
                metrics.BATCHED.observe(metrics.FANOUT_DELAY, now - stream.watch.notified_at, written)

    def _hand_back(self, stream: _Stream, position: EntryId) -> None:
        for reader in stream.parked.get(position, ()):
            _resolve(reader.wake)


def _resolve(future: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        if not future.done():
            future.set_result(None)
