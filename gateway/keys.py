"""Every Redis key and channel name the gateway uses, built in one place.

Streams are spread over a fixed number of *shards* (DSGW_SHARDS, default 1024,
chosen once per deployment). The shard is the hash tag of every key of the
stream, and of the shard's sync feed, so that one Lua script can append to a
stream *and* record the append in the feed atomically, even on Redis Cluster
(where a script may only touch keys of one slot). Each shard's tag hashes to
the middle of its own 1/N of the slots (gateway/shard_tags.py, e.g. ``{t1x3}``),
so every master of a cluster holds the same number of shards. DSGW_SHARDS=16
keeps the tags of earlier versions, ``{s00}``..``{s15}`` (the *legacy* layout,
which splits 8/4/4 over 3 masters). The layout a Redis was written with is
recorded in LAYOUT_KEY (gateway/layout.py); `dsgw reshard --to N` moves every
stream to another shard count (gateway/reshard.py).

Layout for the stream ``chat/room-1`` in shard 7 of the legacy layout::

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
    dstrim:{s07}                 ZSET    tiered streams of shard 7 -> when their oldest entry ages out of
                                         DSGW_RETAIN_SECONDS (ms), for the sink's trim sweep
    ds:{s07}:chat/room-1:subs    SET     ids of the subscriptions linked to this stream (outlives the stream)
    dswake:{s07}                 ZSET    streams of shard 7 with new data for their subscriptions -> when
                                         (ms); written by append/create only when :subs exists
    ds:dswake:{s07}              channel published by append/create with each wake they queue in
                                         dswake:{s07} (the dispatcher polls that queue at once)

The shard of a name is crc32(name) mod DSGW_SHARDS; `dsgw info NAME` prints the keys.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache

from .shard_tags import balanced_tags

PREFIX = "ds"
FEED_PREFIX = "dsfeed"
FORK_DEADLINES_PREFIX = "dsforks"
TRIM_DUE_PREFIX = "dstrim"
WAKE_QUEUE_PREFIX = "dswake"
# Changing the shard count moves every stream to other keys: set it once
# (or move them with `dsgw reshard --to N`).
SHARDS = int(os.environ.get("DSGW_SHARDS", "1024"))
LEGACY_SHARDS = 16  # the layout of earlier versions: tags {s00}..{s15}
# STRING: the shard layout this Redis was written with (gateway/layout.py),
# e.g. "balanced-1024" or "legacy-16"; "resharding:<from>:<to>" during a reshard.
LAYOUT_KEY = "dslayout"


def layout_name(shards: int = SHARDS) -> str:
    return f"legacy-{shards}" if shards == LEGACY_SHARDS else f"balanced-{shards}"


@lru_cache(maxsize=8)
def shard_tags(shards: int = SHARDS) -> tuple[str, ...]:
    """Each shard's hash tag, braces included."""
    if shards == LEGACY_SHARDS:
        return tuple(f"{{s{i:02d}}}" for i in range(shards))
    return tuple(f"{{{tag}}}" for tag in balanced_tags(shards))


@lru_cache(maxsize=8)
def shard_of_tag(shards: int = SHARDS) -> dict[str, int]:
    """Tag (braces included) -> shard, for reading key names back."""
    return {tag: i for i, tag in enumerate(shard_tags(shards))}


def shard_of(name: str, shards: int = SHARDS) -> int:
    return zlib.crc32(name.encode()) % shards


def shard_tag(shard: int, shards: int = SHARDS) -> str:
    return shard_tags(shards)[shard]


def feed_key(shard: int, shards: int = SHARDS) -> str:
    return f"{FEED_PREFIX}:{shard_tag(shard, shards)}"


def fork_deadlines_key(shard: int, shards: int = SHARDS) -> str:
    return f"{FORK_DEADLINES_PREFIX}:{shard_tag(shard, shards)}"


def wake_queue_key(shard: int) -> str:
    """Streams of `shard` whose subscriptions must hear of new data (gateway/subscriptions/dispatch.py)."""
    return f"{WAKE_QUEUE_PREFIX}:{shard_tag(shard)}"


def wake_channel(shard: int) -> str:
    """Published with every wake queued in `shard`'s queue (on the queue's own slot,
    so SPUBLISH reaches its node; `ds:` for the ACL's `&ds:*`). append.lua and
    create.lua build it from the queue key they get: keep the two in step."""
    return f"{PREFIX}:{wake_queue_key(shard)}"


def trim_due_key(shard: int, shards: int = SHARDS) -> str:
    return f"{TRIM_DUE_PREFIX}:{shard_tag(shard, shards)}"


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
    subs: str
    wakes: str

    @property
    def own(self) -> list[str]:
        """The keys that belong to this stream alone (deleted with it)."""
        return [self.meta, self.data, self.producers, self.forks]

    @property
    def all(self) -> list[str]:
        """KEYS for the scripts: meta, data, producers, forks, feed, tombstone, fork deadlines,
        subscription links, the shard's wake queue (one slot)."""
        return [
            self.meta,
            self.data,
            self.producers,
            self.forks,
            self.feed,
            self.tombstone,
            self.fork_deadlines,
            self.subs,
            self.wakes,
        ]


@lru_cache(maxsize=8192)  # a session's stream is used again and again: build its keys once
def stream_keys(name: str) -> StreamKeys:
    return stream_keys_in(name, SHARDS)


def stream_keys_in(name: str, shards: int) -> StreamKeys:
    """The keys of `name` in a layout of `shards` shards (`dsgw reshard`)."""
    shard = shard_of(name, shards)
    tag = shard_tag(shard, shards)
    base = f"{PREFIX}:{tag}:{name}"
    return StreamKeys(
        name=name,
        shard=shard,
        meta=f"{base}:meta",
        data=f"{base}:data",
        producers=f"{base}:prod",
        forks=f"{base}:forks",
        feed=f"{FEED_PREFIX}:{tag}",
        tombstone=f"{base}:tomb",
        fork_deadlines=f"{FORK_DEADLINES_PREFIX}:{tag}",
        creating=f"{base}:creating",
        channel=f"{base}:notify",
        subs=f"{base}:subs",
        wakes=f"{WAKE_QUEUE_PREFIX}:{tag}",
    )


def name_from_meta_key(key: str) -> str | None:
    """Inverse of ``stream_keys(name).meta``, for SCAN-based listings."""
    if not (key.startswith(f"{PREFIX}:{{") and key.endswith(":meta")):
        return None
    head, sep, rest = key.partition("}:")
    return rest[: -len(":meta")] if sep else None


def split_stream_key(key: str) -> tuple[str, str, str] | None:
    """``ds:{tag}:NAME:suffix`` -> (tag with braces, NAME, suffix), else None."""
    if not key.startswith(f"{PREFIX}:{{"):
        return None
    head, sep, rest = key.partition("}:")
    name, sep2, suffix = rest.rpartition(":")
    if not (sep and sep2):
        return None
    return head[len(PREFIX) + 1 :] + "}", name, suffix


META_SCAN_PATTERN = f"{PREFIX}:{{*}}:*:meta"
STREAM_KEYS_SCAN_PATTERN = f"{PREFIX}:{{*}}:*"

# Redis memory per shard (gateway/shard_stats.py): HASH shard -> "keys bytes",
# written by whichever gateway holds the lease (STRING, PX) of the interval.
SHARD_STATS = "dsstats:shards"
SHARD_STATS_LEASE = "dsstats:lease"

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

# Subscriptions (gateway/subscriptions/, issue 12). Each subscription's keys
# share one hash tag (a digest of its id, so any id is a safe tag), so every
# transition is one Lua script on one slot::
#
#     dssub:{<h>}:def     HASH   its configuration (type, pattern, webhook url, wake stream, ...)
#     dssub:{<h>}:links   HASH   stream path -> link types: "e" explicit, "g" glob, "eg" both
#     dssub:{<h>}:acked   HASH   stream path -> acked offset (last processed, inclusive)
#     dssub:{<h>}:tails   HASH   stream path -> newest tail offset the dispatcher reported
#     dssub:{<h>}:state   HASH   generation, wake id, holder, lease and delivery deadlines, retries
#     dssub:{<h>}:pend    SET    linked streams whose known tail is past their acked cursor: a
#                                wake looks here, not at every link (a pattern may link millions)
#
# and the registry, one key each:
#
#     dssubs:all          SET    every subscription id
#     dssubs:patterns     HASH   id -> {"pattern", "wake_stream"} of pattern subscriptions (stream creation reads it)
#     dssubs:patver       STRING bumped on every change of dssubs:patterns, so replicas re-read it only then
#     dssubs:timers       ZSET   id -> when a replica must look at it next (ms): leases, retries, deliveries
SUB_PREFIX = "dssub"
SUBSCRIPTIONS = "dssubs:all"
SUB_PATTERNS = "dssubs:patterns"
SUB_PATTERNS_VERSION = "dssubs:patver"
SUB_TIMERS = "dssubs:timers"
# STRING (PX): the replica that holds it makes this interval's round over every
# shard's wake queue (gateway/subscriptions/dispatch.py); the others skip it.
SUB_FULL_POLL_LEASE = "dssubs:fullpoll"


@dataclass(frozen=True, slots=True)
class SubscriptionKeys:
    """The keys of one subscription, in the order the sub_*.lua scripts take them."""

    id: str
    definition: str
    links: str
    acked: str
    tails: str
    state: str
    pending: str

    @property
    def all(self) -> list[str]:
        return [self.definition, self.links, self.acked, self.tails, self.state, self.pending]


def subscription_keys(sub_id: str) -> SubscriptionKeys:
    base = f"{SUB_PREFIX}:{{{hashlib.sha256(sub_id.encode()).hexdigest()[:16]}}}"
    return SubscriptionKeys(
        id=sub_id,
        definition=f"{base}:def",
        links=f"{base}:links",
        acked=f"{base}:acked",
        tails=f"{base}:tails",
        state=f"{base}:state",
        pending=f"{base}:pend",
    )
