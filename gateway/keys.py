"""Every Redis key and channel name the gateway uses, built in one place.

Streams are spread over a fixed number of *shards* (DSGW_SHARDS, default 16,
chosen once per deployment). The shard is the hash tag of every key of the
stream, and of the shard's sync feed, so that one Lua script can append to a
stream *and* record the append in the feed atomically, even on Redis Cluster
(where a script may only touch keys of one slot). Shards spread over the
cluster's nodes like any other slots.

Layout for the stream ``chat/room-1`` in shard 7::

    ds:{s07}:chat/room-1:meta    HASH    configuration and state (content type, tail, closed, ...)
    ds:{s07}:chat/room-1:data    STREAM  the messages; entry ID <-> DS offset (see offsets.py)
    ds:{s07}:chat/room-1:prod    HASH    idempotent producers: id -> "epoch seq updated_ms"
    ds:{s07}:chat/room-1:forks   SET     names of the forks that still read through this stream
    ds:{s07}:chat/room-1:tomb    STRING  last entry ID of a removed stream (10 min): a re-created
                                         stream continues above it, so offsets never repeat
    ds:{s07}:chat/room-1:creating STRING while this stream is being created as a fork (60 s at most):
                                         its reference on the source is not a vanished fork's
    ds:{s07}:chat/room-1:notify  channel published by every write, for live readers
    dsfeed:{s07}                 STREAM  sync feed of shard 7: one entry per append to a synced stream
    dsforks:{s07}                ZSET    forks of shard 7 with a TTL or Expires-At -> deadline (ms), for
                                         the fork sweeper (forks are never left to Redis key expiry)

The shard of a name is crc32(name) mod DSGW_SHARDS; `dsgw info NAME` prints the keys.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache

PREFIX = "ds"
FEED_PREFIX = "dsfeed"
FORK_DEADLINES_PREFIX = "dsforks"
# Changing the shard count moves every stream to other keys: set it once.
SHARDS = int(os.environ.get("DSGW_SHARDS", "16"))


def shard_of(name: str, shards: int = SHARDS) -> int:
    return zlib.crc32(name.encode()) % shards


def shard_tag(shard: int) -> str:
    return f"{{s{shard:02d}}}"


def feed_key(shard: int) -> str:
    return f"{FEED_PREFIX}:{shard_tag(shard)}"


def fork_deadlines_key(shard: int) -> str:
    return f"{FORK_DEADLINES_PREFIX}:{shard_tag(shard)}"


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The keys of one DS stream, in the order every Lua script takes them."""

    name: str
    shard: int
    meta: str
    data: str
    producers: str
    forks: str
    feed: str
    tombstone: str
    fork_deadlines: str
    creating: str
    channel: str

    @property
    def own(self) -> list[str]:
        """The keys that belong to this stream alone (deleted with it)."""
        return [self.meta, self.data, self.producers, self.forks]

    @property
    def all(self) -> list[str]:
        """KEYS for the scripts: meta, data, producers, forks, feed, tombstone, fork deadlines (one slot)."""
        return [
            self.meta,
            self.data,
            self.producers,
            self.forks,
            self.feed,
            self.tombstone,
            self.fork_deadlines,
        ]


@lru_cache(maxsize=8192)  # a session's stream is used again and again: build its keys once
def stream_keys(name: str) -> StreamKeys:
    shard = shard_of(name)
    base = f"{PREFIX}:{shard_tag(shard)}:{name}"
    return StreamKeys(
        name=name,
        shard=shard,
        meta=f"{base}:meta",
        data=f"{base}:data",
        producers=f"{base}:prod",
        forks=f"{base}:forks",
        feed=feed_key(shard),
        tombstone=f"{base}:tomb",
        fork_deadlines=fork_deadlines_key(shard),
        creating=f"{base}:creating",
        channel=f"{base}:notify",
    )


def name_from_meta_key(key: str) -> str | None:
    """Inverse of ``stream_keys(name).meta``, for SCAN-based listings."""
    if not (key.startswith(f"{PREFIX}:{{s") and key.endswith(":meta")):
        return None
    head, sep, rest = key.partition("}:")
    return rest[: -len(":meta")] if sep else None


META_SCAN_PATTERN = f"{PREFIX}:{{s*}}:*:meta"

RATE_PREFIX = "dsrl"


def rate_key(identity: str, kind: str) -> str:
    """A rate-limit key of one credential or client (gateway/ratelimit.py):
    ``dsrl:{<hash of the identity>}:appends`` (STRING, a per-second counter) or
    ``:live`` (ZSET, live connection id -> end of its lease in ms). Hashed so
    neither a token nor an address is stored, and so the key has a fixed size."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return f"{RATE_PREFIX}:{{{digest}}}:{kind}"


# Subscription security keys (gateway/subscriptions/signing.py): one STRING each,
# a JSON key set created once with SET NX and shared by every replica.
WEBHOOK_SIGNING_KEYS = "dskeys:webhook-signing"  # Ed25519 private keys that sign webhook deliveries
CALLBACK_TOKEN_KEYS = "dskeys:callback-token"  # HMAC keys of callback / claim tokens
