"""The storage layer: typed wrappers around the Lua scripts, and reads that
stitch a fork's inherited data to its own. Knows the protocol's refusals
(ProblemError), not HTTP."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .keys import StreamKeys, stream_keys
from .offsets import ZERO_ID, EntryId, entry_id_str, format_offset, parse_entry_id
from .protocol import JSON_MEDIA_TYPE, ProblemError, bad_request, is_json
from .redis_mux import Mux
from .scripts import Scripts
from .tiering.cold import ColdRange, read_cold, read_cold_entries
from .tiering.history import History


@dataclass(slots=True)
class Entry:
    """One Redis Stream entry: one message (JSON mode) or one append (bytes)."""

    id: EntryId
    payload: bytes
    more: int  # messages of the same append that follow this one


@dataclass(slots=True)
class StreamMeta:
    content_type: str
    media_type: str
    json: bool
    tail: EntryId
    closed: bool
    gen: str
    ttl: int | None = None
    expires_at: str | None = None
    expires_ms: int | None = None
    source: str | None = None
    fork_offset: EntryId | None = None
    # Tiered history: entries up to `trim` left Redis (None: nothing did);
    # this incarnation of the stream has no entries at or below `base`.
    trim: EntryId | None = None
    base: EntryId = ZERO_ID

    @property
    def tail_offset(self) -> str:
        return format_offset(self.tail)


@dataclass(slots=True)
class ReadResult:
    """A read: `body` holds `count` messages (JSON mode: their texts joined
    with ',', without brackets; else the appends' bytes concatenated)."""

    meta: StreamMeta
    body: bytes
    count: int
    next_id: EntryId
    # SSE events framed from this read, shared by the readers it woke (gateway/reads.py).
    frames: dict[tuple[bool, str, bool], bytes] | None = None

    @property
    def up_to_date(self) -> bool:
        return self.next_id >= self.meta.tail

    @property
    def closed_at_end(self) -> bool:
        """The stream is closed and this read reached its final offset."""
        return self.meta.closed and self.up_to_date

    @property
    def next_offset(self) -> str:
        return format_offset(self.next_id)


@dataclass(slots=True)
class WriteOutcome:
    """What an append or close did; `status` is the script's first reply word."""

    status: str
    tail: EntryId = ZERO_ID
    closed: bool = False
    producer_seq: int | None = None
    detail: str = ""

    @property
    def tail_offset(self) -> str:
        return format_offset(self.tail)


@dataclass(slots=True)
class CreateOutcome:
    created: bool
    tail: EntryId
    closed: bool
    content_type: str


@dataclass(slots=True)
class ForkRequest:
    source: str
    offset: EntryId | None  # None: the source's tail
    sub_offset: int


Messages = list[bytes] | list[str]

# How long a fork's "being created" marker lives if its gateway dies meanwhile.
CREATING_MS = 60_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_meta(flat: list[Any]) -> StreamMeta:
    """A stream's meta from HGETALL's flat [field, value, ...] reply."""
    m = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    fofs, ttl, exp, trim = m.get("fofs"), m.get("ttl"), m.get("exp"), m.get("trim")
    return StreamMeta(
        content_type=m.get("ct", ""),
        media_type=m.get("mt", ""),
        json=m.get("json") == "1",
        tail=parse_entry_id(m.get("tail", "0-0")),
        closed=m.get("closed") == "1",
        gen=m.get("gen", ""),
        ttl=int(ttl) if ttl else None,
        expires_at=m.get("exp_raw"),
        expires_ms=int(exp) if exp else None,
        source=m.get("src"),
        fork_offset=parse_entry_id(fofs) if fofs else None,
        trim=parse_entry_id(trim) if trim else None,
        base=parse_entry_id(m.get("base", "0-0")),
    )


def parse_entries(raw: list[Any], cap: EntryId | None = None) -> list[Entry]:
    """Entries from a raw XRANGE reply. With `cap` (the fork offset a fork
    reads an ancestor up to), the entry at the cap ends its append as far as
    that fork can see."""
    entries = []
    for entry_id, flat in raw:
        payload, more = b"", 0
        for i in range(0, len(flat), 2):
            field = flat[i]
            if field in (b"json", b"data"):
                payload = flat[i + 1]
            elif field == b"more":
                more = int(flat[i + 1])
        eid = parse_entry_id(entry_id)
        if cap is not None and eid >= cap:
            more = 0
        entries.append(Entry(eid, payload, more))
    return entries


def _groups_args(groups: list[Messages]) -> list[Any]:
    args: list[Any] = [len(groups)]
    for group in groups:
        args.append(len(group))
        args.extend(group)
    return args


class Store:
    """All stream operations of one gateway process."""

    def __init__(
        self,
        mux: Mux,
        publish_command: str = "PUBLISH",
        sink_filter: Callable[[str], bool] = lambda name: True,
        max_producers: int = 10_000,
        producer_idle_s: int = 7 * 86400,
        tiered: bool = False,
    ) -> None:
        self.mux = mux
        # Retention on (DSGW_RETAIN_*): every new stream goes to the sync feed and
        # Postgres stream_history, so that Redis may trim it (issue 11).
        self.tiered = tiered
        # Producer state per stream is bounded (see save_producer in common.lua).
        self._producer_limits = (max_producers, producer_idle_s * 1000)
        self.scripts = Scripts(mux)
        self.publish_command = publish_command
        # Which JSON streams the Postgres sink receives, decided once at creation.
        self.sink_filter = sink_filter
        # Where reads below a stream's trim point go (gateway/tiering/); None: 410.
        self.history: History | None = None
        # Pattern subscriptions a new stream is linked to at creation, '\n'-joined
        # (gateway/subscriptions/patterns.py); None while subscriptions are off.
        self.subscription_links: Callable[[str], Awaitable[str]] | None = None

    # --- writes ---------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        content_type: str,
        media_type: str,
        ttl: int | None,
        expires_at: tuple[str, int] | None,
        closed: bool,
        body: Messages | None,
        fork: ForkRequest | None = None,
    ) -> CreateOutcome:
        keys = stream_keys(name)
        async with self._fork_in_making(keys, fork):
            groups: list[Messages] = []
            fork_args = ["", "", "", ""]
            if fork is not None:
                source_meta, fork_id = await self._acquire_fork(name, keys, fork, media_type)
                try:
                    content_type = content_type or source_meta.content_type
                    media_type = source_meta.media_type
                    if ttl is None and expires_at is None:
                        # A fork without its own expiry inherits the source's.
                        ttl = source_meta.ttl
                        if ttl is None and source_meta.expires_at and source_meta.expires_ms:
                            expires_at = (source_meta.expires_at, source_meta.expires_ms)
                    if fork.sub_offset:
                        groups.append(await self._sub_offset_prefix(fork.source, fork_id, fork.sub_offset))
                except BaseException:
                    await self._release_unowned(name, fork.source)
                    raise
                fork_args = [
                    fork.source,
                    entry_id_str(fork_id),
                    "1" if fork.offset is not None else "",
                    str(fork.sub_offset) if fork.sub_offset else "",
                ]
            if body:
                groups.append(body)
            args = [
                content_type,
                media_type,
                "1" if is_json(media_type) else "",
                "" if ttl is None else str(ttl),
                expires_at[0] if expires_at else "",
                str(expires_at[1]) if expires_at else "",
                "1" if closed else "",
                *fork_args,
                secrets.token_hex(6),
                "",
                name,
                "1" if is_json(media_type) and self.sink_filter(name) else "",
                "1" if self.tiered else "",
                await self.subscription_links(name) if self.subscription_links else "",
                *_groups_args(groups),
            ]
            reply = await self.scripts.call("create", keys.all, args)
            status = _text(reply[0])
            if status == "created":
                replaced_source = _text(reply[3])
                # An expired stream this one replaced held a reference on its source;
                # a fork re-created on the same source keeps using that reference.
                if replaced_source and (fork is None or replaced_source != fork.source):
                    await self.release_fork(replaced_source, name)
                return CreateOutcome(True, parse_entry_id(reply[1]), reply[2] == b"1", content_type)
            if fork is not None and status != "exists":
                await self._release_unowned(name, fork.source)
            if status == "exists":
                return CreateOutcome(False, parse_entry_id(reply[1]), reply[2] == b"1", _text(reply[3]))
            if status == "gone":
                raise ProblemError(409, "Stream was deleted", "forks still read through this path")
            raise ProblemError(409, "Stream exists with a different configuration")

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

    async def create_json_stream(self, name: str) -> None:
        """Create `name` as a plain application/json stream unless a stream of
        that name exists (whatever its configuration)."""
        with contextlib.suppress(ProblemError):  # 409: it exists
            await self.create(
                name, content_type=JSON_MEDIA_TYPE, media_type=JSON_MEDIA_TYPE,
                ttl=None, expires_at=None, closed=False, body=None,
            )  # fmt: skip

    async def media_type_of(self, name: str) -> str:
        meta_key = stream_keys(name).meta
        media = await self.mux.execute("HGET", meta_key, "mt", key=meta_key, retry_if_lost=True)
        if media is None:
            raise ProblemError(404, "Fork source not found", name)
        return _text(media)

    async def _acquire_fork(
        self, name: str, keys: StreamKeys, fork: ForkRequest, media_type: str
    ) -> tuple[StreamMeta, EntryId]:
        source = stream_keys(fork.source)
        offset = entry_id_str(fork.offset) if fork.offset is not None else ""
        reply = await self.scripts.call("fork_acquire", source.all, [name, media_type, offset])
        status = _text(reply[0])
        if status == "ok":
            return parse_meta(reply[2]), parse_entry_id(reply[1])
        if status == "expired" and reply[1]:
            await self.release_fork(_text(reply[1]), fork.source)
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
        if current is None or _text(current) != source:
            await self.release_fork(source, name)

    async def release_fork(self, source: str | None, fork: str) -> None:
        """Drop `fork`'s reference on `source`, cascading up a chain of deleted sources."""
        while source:
            reply = await self.scripts.call("fork_release", stream_keys(source).all, [fork])
            if _text(reply[0]) != "deleted":
                return
            fork, source = source, _text(reply[1])

    async def append(
        self,
        name: str,
        media_type: str,
        messages: Messages,
        *,
        close: bool = False,
        stream_seq: str | None = None,
        producer: tuple[str, int, int] | None = None,
        source_seq: str | None = None,
    ) -> WriteOutcome:
        """Append one group of messages. `source_seq` is the Postgres source
        worker's own exactly-once sequence (fixed width, compared byte-wise;
        status 'source_dup' with the stored one in `detail` when not above it)."""
        keys = stream_keys(name)
        pid, epoch, seq = producer or ("", 0, 0)
        args = [
            media_type,
            "1" if close else "",
            stream_seq or "",
            pid,
            epoch,
            seq,
            self.publish_command,
            keys.channel,
            source_seq or "",
            *self._producer_limits,
            1,
            len(messages),
            *messages,
        ]
        reply = await self.scripts.call("append", keys.all, args)
        return await self._outcome(name, reply)

    async def close(self, name: str, producer: tuple[str, int, int] | None) -> WriteOutcome:
        keys = stream_keys(name)
        pid, epoch, seq = producer or ("", 0, 0)
        args = [pid, epoch, seq, self.publish_command, keys.channel, *self._producer_limits]
        reply = await self.scripts.call("close", keys.all, args)
        return await self._outcome(name, reply)

    async def _outcome(self, name: str, reply: list[Any]) -> WriteOutcome:
        status = _text(reply[0])
        if status == "ok":
            return WriteOutcome(status, parse_entry_id(reply[1]), len(reply) > 2 and reply[2] == b"1")
        if status == "dup":
            return WriteOutcome(status, parse_entry_id(reply[1]), False, int(reply[2]))
        if status == "closed_dup":
            return WriteOutcome(status, parse_entry_id(reply[1]), True, int(reply[2]))
        if status == "closed":
            return WriteOutcome(status, parse_entry_id(reply[1]), True)
        if status == "source_dup":
            return WriteOutcome(status, detail=_text(reply[1]))
        await self._raise_missing(name, status, reply)
        return WriteOutcome(status, detail=_text(reply[1]) if len(reply) > 1 else "")

    async def _raise_missing(self, name: str, status: str, reply: list[Any]) -> None:
        if status == "expired" and len(reply) > 1 and reply[1]:
            await self.release_fork(_text(reply[1]), name)
        if status in ("absent", "expired"):
            raise ProblemError(404, "Stream not found")
        if status == "gone":
            raise ProblemError(410, "Stream was deleted")

    async def delete(self, name: str) -> None:
        keys = stream_keys(name)
        reply = await self.scripts.call("delete", keys.all, [self.publish_command, keys.channel])
        status = _text(reply[0])
        if status == "deleted":
            if reply[1]:
                await self.release_fork(_text(reply[1]), name)
            return
        if status == "soft":
            await self._release_vanished_forks(name)
            return
        await self._raise_missing(name, status, reply)

    async def _release_vanished_forks(self, name: str) -> None:
        """Drop references of forks that are gone without releasing them (a
        gateway that died between deleting a fork and releasing its source):
        otherwise this soft-deleted stream would never go."""
        forks_key = stream_keys(name).forks
        for raw in await self.mux.execute("SMEMBERS", forks_key, key=forks_key, retry_if_lost=True):
            fork = stream_keys(_text(raw))
            # Both keys share the fork's slot: one EXISTS counts either.
            alive = await self.mux.execute(
                "EXISTS", fork.meta, fork.creating, key=fork.meta, retry_if_lost=True
            )
            if not alive:
                await self.release_fork(name, fork.name)

    # --- reads ------------------------------------------------------------------

    async def read(
        self,
        name: str,
        after: EntryId | None,
        *,
        touch: bool,
        max_bytes: int,
        max_entries: int,
    ) -> ReadResult:
        """The stream's metadata and, unless `after` is None, its data after that
        offset: whole appends only, stopping after the append that crosses
        `max_bytes` (or `max_entries` entries). 404/410 for missing or deleted
        streams."""
        keys = stream_keys(name)
        args = ["" if after is None else entry_id_str(after), max_bytes, "1" if touch else "", max_entries]
        reply = await self.scripts.call("read", keys.all, args, changes_nothing=True)
        status = _text(reply[0])
        if status == "live":
            meta = parse_meta(reply[1])
            if not reply[4]:
                # Nothing new (or past the tail): the next offset is the tail itself.
                return ReadResult(meta, b"", 0, meta.tail)
            return ReadResult(meta, reply[2], reply[4], parse_entry_id(reply[3]))
        if status == "fork":
            assert after is not None
            return await self._read_fork(name, parse_meta(reply[1]), after, max_bytes, max_entries)
        if status == "cold":
            assert after is not None
            meta = parse_meta(reply[3])
            trim, base = parse_entry_id(reply[1]), parse_entry_id(reply[2])
            span = ColdRange(name, after, trim, trim, base)
            rows = await read_cold(self.history, span, max_bytes, max_entries, json=meta.json)
            assert rows.last is not None
            # Stops at trim at the latest: the next read continues in Redis.
            return ReadResult(meta, rows.body, rows.count, rows.last)
        await self._raise_missing(name, status, reply)
        raise AssertionError(status)  # _raise_missing raised

    async def read_entries(self, name: str, after: EntryId, limit: int) -> tuple[StreamMeta, list[Entry]]:
        """Up to `limit` messages after `after`, each with its entry ID: for
        tools that print offsets per message (`dsgw tail`), not the hot path."""
        result = await self.read(name, None, touch=False, max_bytes=0, max_entries=0)
        return result.meta, await self._read_view(name, result.meta, after, None, limit)

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
            current, upper = _text(src), min(upper, lower)
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
