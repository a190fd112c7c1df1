"""DS offsets <-> Redis Stream entry IDs.

A DS offset names the position just after a message. We use the ID of the Redis
entry that holds the message, written in a fixed width so that string order is
numeric order (clients may compare offsets as strings)::

    Redis entry ID  1732434000123-7   <->   DS offset 0001732434000123_0000000000000007

The empty stream's tail is ``0-0`` = ``0000000000000000_0000000000000000``. A read
from offset O returns the entries whose ID is greater than O, so any offset the
server ever returned (and any well-formed offset between two entries) resumes
without gaps or duplicates.
"""

from __future__ import annotations

import re

ZERO_OFFSET = "0000000000000000_0000000000000000"
ZERO_ID = (0, 0)
MAX_PART = 2**64 - 1  # Redis entry ID parts are unsigned 64-bit
_OFFSET_RE = re.compile(r"[0-9]{1,20}_[0-9]{1,20}", re.ASCII)

EntryId = tuple[int, int]


class BadOffset(ValueError):
    """The offset string is not one this server can have produced."""


def format_offset(entry_id: EntryId) -> str:
    return f"{entry_id[0]:016d}_{entry_id[1]:016d}"


def parse_offset(text: str) -> EntryId:
    """Parse a concrete offset (not a sentinel); raise BadOffset if malformed."""
    if not _OFFSET_RE.fullmatch(text):
        raise BadOffset(text)
    ms, _, seq = text.partition("_")
    ms_i, seq_i = int(ms), int(seq)
    if ms_i > MAX_PART or seq_i > MAX_PART:
        raise BadOffset(text)
    return ms_i, seq_i


def parse_entry_id(raw: bytes | str) -> EntryId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def entry_id_str(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def entry_id_to_offset(raw: bytes | str) -> str:
    return format_offset(parse_entry_id(raw))
