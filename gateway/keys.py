"""Every Redis key and channel name the gateway uses, built in one place.

All keys of one DS stream share the hash tag ``{<name>}``, so they live in one
Redis Cluster slot and every Lua script touches a single slot. Inside the tag the
characters ``{``, ``}`` and ``%`` are percent-encoded: a name such as ``}x`` would
otherwise end the tag early (or leave it empty) and scatter a stream's keys over
several slots.

Layout for the stream ``chat/room-1``::

    ds:{chat/room-1}:meta    HASH    configuration and state (content type, tail, closed, ...)
    ds:{chat/room-1}:data    STREAM  the messages; entry ID <-> DS offset (see offsets.py)
    ds:{chat/room-1}:prod    HASH    idempotent producers: id -> "epoch seq"
    ds:{chat/room-1}:forks   SET     names of the forks that still read through this stream
    ds:{chat/room-1}:notify  channel published by every write, for live readers
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "ds"


def tag(name: str) -> str:
    """The cluster hash tag body for a stream name (percent-encodes braces)."""
    if "{" in name or "}" in name or "%" in name:
        name = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return name


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The keys of one DS stream, in the order every Lua script takes them."""

    name: str
    meta: str
    data: str
    producers: str
    forks: str
    channel: str

    @property
    def all(self) -> list[str]:
        """KEYS for the scripts: meta, data, producers, forks."""
        return [self.meta, self.data, self.producers, self.forks]


def stream_keys(name: str) -> StreamKeys:
    base = f"{PREFIX}:{{{tag(name)}}}"
    return StreamKeys(
        name=name,
        meta=f"{base}:meta",
        data=f"{base}:data",
        producers=f"{base}:prod",
        forks=f"{base}:forks",
        channel=f"{base}:notify",
    )


def name_from_meta_key(key: str) -> str | None:
    """Inverse of ``stream_keys(name).meta``, for SCAN-based listings."""
    head, tail = f"{PREFIX}:{{", "}:meta"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    body = key[len(head) : -len(tail)]
    return body.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


META_SCAN_PATTERN = f"{PREFIX}:{{*}}:meta"
