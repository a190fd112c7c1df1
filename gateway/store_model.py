"""What the storage layer hands out (entries, a stream's metadata, read, write
and create outcomes, fork requests) and the parsing of the Lua scripts' raw
replies into them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .offsets import ZERO_ID, EntryId, format_offset, parse_entry_id


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


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_meta(flat: list[Any]) -> StreamMeta:
    """A stream's meta from HGETALL's flat [field, value, ...] reply."""
    m = {as_text(flat[i]): as_text(flat[i + 1]) for i in range(0, len(flat), 2)}
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
