"""Forks, for Store (gateway/store.py): the "being created" marker, taking and
dropping a fork's reference on its source, the sub-offset prefix a fork starts
with, and reads that stitch a fork's inherited data (along its source chain,
tiered history included) to its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .keys import StreamKeys, stream_keys
from .offsets import ZERO_ID, EntryId, entry_id_str, parse_entry_id
from .protocol import ProblemError, bad_request
from .redis_mux import Mux
from .scripts import Scripts
from .store_model import (
    Entry,
    ForkRequest,
    Messages,
    ReadResult,
    StreamMeta,
    as_text,
    parse_entries,
    parse_meta,
)
from .tiering.cold import ColdRange, read_cold, read_cold_entries
from .tiering.history import History

# How long a fork's "being created" marker lives if its gateway dies meanwhile.
CREATING_MS = 60_000


class ForkOps:
    """Store's fork operations; Store (which sets these attributes) inherits them."""

    mux: Mux
    scripts: Scripts
    history: History | None

    @contextlib.asynccontextmanager
    async def _fork_in_making(self, keys: StreamKeys, fork: ForkRequest | None) -> AsyncIterator[None]:
        """While a fork is being made, its reference on the source exists but the
        fork does not yet: the marker keeps a concurrent delete of the source
        from taking the reference for a vanished fork's."""
        if fork is None:
            yield
            return
        await self.mux.execute("SET", keys.creating, "1", "PX", CREATING_MS, key=keys.creating)
        try:
            yield
        finally:
            await self.mux.execute("DEL", keys.creating, key=keys.creating)

    async def media_type_of(self, name: str) -> str:
        meta_key = stream_keys(name).meta
        media = await self.mux.execute("HGET", meta_key, "mt", key=meta_key, retry_if_lost=True)
        if media is None:
            raise ProblemError(404, "Fork source not found", name)
        return as_text(media)

    async def _acquire_fork(
        self, name: str, keys: StreamKeys, fork: ForkRequest, media_type: str
    ) -> tuple[StreamMeta, EntryId]:
        source = stream_keys(fork.source)
        offset = entry_id_str(fork.offset) if fork.offset is not None else ""
        reply = await self.scripts.call("fork_acquire", source.all, [name, media_type, offset])
        status = as_text(reply[0])
        if status == "ok":
            return parse_meta(reply[2]), parse_entry_id(reply[1])
        if status == "expired" and reply[1]:
            await self.release_fork(as_text(reply[1]), fork.source)
        if status in ("absent", "expired"):
            raise ProblemError(404, "Fork source not found", fork.source)
        if status == "gone":
            raise ProblemError(409, "Fork source was deleted", fork.source)
        if status == "ct_mismatch":
            raise ProblemError(409, "Content-Type differs from the fork source")
        raise bad_request("Invalid Stream-Fork-Offset", "beyond the source's tail")

    async def _sub_offset_prefix(self, source: str, fork_id: EntryId, sub: int) -> Messages:
        """The first `sub` bytes (or messages, in JSON mode) of the source's
        next append after the fork offset: the fork's first own append. Reads
        that one append at most, whatever `sub` says."""
        meta = await self._meta(source)
        first = await self._read_view(source, meta, fork_id, None, 1)
        if not first:
            raise bad_request("Invalid Stream-Fork-Sub-Offset", "no data after the fork offset")
        if meta.json:
            if sub > first[0].more + 1:  # `more`: messages of the append after this one
                raise bad_request("Invalid Stream-Fork-Sub-Offset", "beyond the next append")
            group = first if sub == 1 else await self._read_view(source, meta, fork_id, None, sub)
            return [e.payload for e in group[:sub]]
        data = first[0].payload
        if sub > len(data):
            raise bad_request("Invalid Stream-Fork-Sub-Offset", "beyond the next append")
        return [data[:sub]]

    async def _meta(self, name: str) -> StreamMeta:
        meta_key = stream_keys(name).meta
        return parse_meta(await self.mux.execute("HGETALL", meta_key, key=meta_key, retry_if_lost=True))

    async def _release_unowned(self, name: str, source: str) -> None:
        """Undo fork_acquire unless `name` already is a live fork of `source`."""
        meta_key = stream_keys(name).meta
        current = await self.mux.execute("HGET", meta_key, "src", key=meta_key, retry_if_lost=True)
        if current is None or as_text(current) != source:
            await self.release_fork(source, name)

    async def release_fork(self, source: str | None, fork: str) -> None:
        """Drop `fork`'s reference on `source`, cascading up a chain of deleted sources."""
        while source:
            reply = await self.scripts.call("fork_release", stream_keys(source).all, [fork])
            if as_text(reply[0]) != "deleted":
                return
            fork, source = source, as_text(reply[1])

    async def _release_vanished_forks(self, name: str) -> None:
        """Drop references of forks that are gone without releasing them (a
        gateway that died between deleting a fork and releasing its source):
        otherwise this soft-deleted stream would never go."""
        forks_key = stream_keys(name).forks
        for raw in await self.mux.execute("SMEMBERS", forks_key, key=forks_key, retry_if_lost=True):
            fork = stream_keys(as_text(raw))
            # Both keys share the fork's slot: one EXISTS counts either.
            alive = await self.mux.execute(
                "EXISTS", fork.meta, fork.creating, key=fork.meta, retry_if_lost=True
            )
            if not alive:
                await self.release_fork(name, fork.name)

    async def _read_fork(
        self, name: str, meta: StreamMeta, after: EntryId, max_bytes: int, max_entries: int
    ) -> ReadResult:
        """A fork read from below its fork offset: the inherited data along the
        source chain, then (budget left) the fork's own."""
        assert meta.source and meta.fork_offset
        sep = b"," if meta.json else b""
        parts: list[bytes] = []
        count = 0
        last = after
        segments = await self._inherited_segments(meta.source, after, meta.fork_offset)
        segments.append((name, max(after, meta.fork_offset), None))
        for segment, start, end in segments:
            if count >= max_entries or sum(len(p) for p in parts) >= max_bytes:
                break
            budget = max(1, max_bytes - sum(len(p) for p in parts))
            keys = stream_keys(segment)
            reply = await self.scripts.call_range(
                (keys.data, keys.meta), start, end, budget, max_entries - count, meta.json
            )
            if reply[0] == b"cold":
                # This part of the chain left Redis: read it from the history, up to
                # its trim point (or the segment's end); the next read goes on in Redis.
                trim, base = parse_entry_id(reply[1]), parse_entry_id(reply[2])
                upper = trim if end is None else min(trim, end)
                span = ColdRange(segment, start, upper, trim, base)
                rows = await read_cold(self.history, span, budget, max_entries - count, json=meta.json)
                assert rows.last is not None
                parts.append(rows.body)
                count += rows.count
                last = rows.last
                break
            _, body, last_id, n = reply
            if n:
                parts.append(body)
                count += n
                last = parse_entry_id(last_id)
            if end is not None and last < end:
                break  # this segment stopped early (budget): later ones wait for the next read
        if not count:
            return ReadResult(meta, b"", 0, meta.tail)
        return ReadResult(meta, sep.join(parts), count, last)

    async def _inherited_segments(
        self, source: str, after: EntryId, cap: EntryId
    ) -> list[tuple[str, EntryId, EntryId | None]]:
        """(stream name, read after, up to) along a fork's source chain, oldest first."""
        segments: list[tuple[str, EntryId, EntryId | None]] = []
        current: str | None = source
        upper = cap
        while current:
            meta_key = stream_keys(current).meta
            src, fofs = await self.mux.execute(
                "HMGET", meta_key, "src", "fofs", key=meta_key, retry_if_lost=True
            )
            lower = parse_entry_id(fofs) if src and fofs else ZERO_ID
            if upper > lower and upper > after:
                segments.append((current, max(after, lower), upper))
            if not src or after >= lower:
                break
            current, upper = as_text(src), min(upper, lower)
        segments.reverse()
        return segments

    async def _read_view(
        self, name: str, meta: StreamMeta, after: EntryId, cap: EntryId | None, limit: int
    ) -> list[Entry]:
        """Up to `limit` entries after `after` as the stream `name` sees them
        (inherited first), without any state checks: for fork bookkeeping."""
        entries: list[Entry] = []
        if meta.source and meta.fork_offset and after < meta.fork_offset:
            upper = meta.fork_offset if cap is None else min(cap, meta.fork_offset)
            for segment, start, end in await self._inherited_segments(meta.source, after, upper):
                if len(entries) >= limit:
                    break
                assert end is not None
                entries += await self._segment_entries(segment, start, end, limit - len(entries))
        if len(entries) < limit:
            start = max(after, meta.fork_offset or ZERO_ID)
            entries += await self._segment_entries(name, start, cap, limit - len(entries))
        return entries

    async def _segment_entries(
        self, name: str, after: EntryId, cap: EntryId | None, limit: int
    ) -> list[Entry]:
        """Up to `limit` entries of one stream's own data in (after, cap]; its
        trimmed part from the history (tiered history)."""
        if limit <= 0:
            return []
        keys = stream_keys(name)
        for _ in range(3):
            trim, base = await self._trim_point(keys)
            entries: list[Entry] = []
            start = after
            if trim is not None and start < trim:
                upper = trim if cap is None else min(trim, cap)
                rows = await read_cold_entries(self.history, ColdRange(name, start, upper, trim, base), limit)
                entries = [
                    Entry(eid, data, 0 if cap is not None and eid >= cap else more)
                    for eid, data, more in rows
                ]
                if len(entries) >= limit or upper == cap:
                    return entries
                start = upper
            raw = await self._xrange(keys.data, start, cap, limit - len(entries))
            # Not atomic (unlike read.lua): entries trimmed above `start` between
            # the two reads would leave a gap, so then read again.
            now_trim, _ = await self._trim_point(keys)
            if now_trim is None or now_trim <= start:
                return entries + parse_entries(raw, cap)
        raise ProblemError(503, "Stream is being trimmed", "try again", headers={"retry-after": "1"})

    async def _trim_point(self, keys: StreamKeys) -> tuple[EntryId | None, EntryId]:
        trim, base = await self.mux.execute(
            "HMGET", keys.meta, "trim", "base", key=keys.meta, retry_if_lost=True
        )
        return (parse_entry_id(trim) if trim else None), parse_entry_id(base or "0-0")

    async def _xrange(self, data_key: str, after: EntryId, upper: EntryId | None, count: int) -> list[Any]:
        end = entry_id_str(upper) if upper else "+"
        command = ("XRANGE", data_key, f"({entry_id_str(after)}", end, "COUNT", count)
        return await self.mux.execute(*command, key=data_key, retry_if_lost=True) or []
