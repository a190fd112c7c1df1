"""Redis memory per shard, for /metrics (issue 11, item 7).

Measured, not maintained: every DSGW_SHARD_STATS_S one gateway process of the
deployment (whichever takes the lease SHARD_STATS_LEASE first) counts each
shard's keys and estimates their memory, and stores the result in
SHARD_STATS (a HASH: shard -> "keys bytes"); every process copies that hash
into its gauges. Counters kept by the Lua scripts would be exact at every
instant, but would put a write on every append (the hot path) and in every
script that frees memory (trim, delete, expiry, which runs no script at all);
a low-frequency estimate costs nothing between collections, and memory per
shard is a capacity-planning number, not a per-request one.

- Redis Cluster: a shard is one hash slot. CLUSTER COUNTKEYSINSLOT gives its
  keys (O(1)); MEMORY USAGE of up to SAMPLE_KEYS keys from CLUSTER
  GETKEYSINSLOT gives their mean size; keys x mean is the estimate. About
  1024 x (2 + SAMPLE_KEYS) cheap commands per collection, pipelined.
- A single Redis keeps no per-slot index: one SCAN over the keyspace, and
  MEMORY USAGE of every key that carries a shard tag (pipelined, COUNT 1000
  at a time). O(keys) per collection, so keep the interval long on big ones.

MEMORY USAGE samples 5 elements of a big value (its default): an estimate.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from prometheus_client import Gauge
from redis.exceptions import RedisError

from .keys import SHARD_STATS, SHARD_STATS_LEASE, SHARDS, feed_key, shard_of_tag, shard_tags

log = logging.getLogger("dsgw.shard_stats")

SAMPLE_KEYS = 8
CHUNK = 256  # commands in flight at once

SHARD_KEYS = Gauge(
    "dsgw_redis_shard_keys", "Redis keys of each shard (streams' keys, feed, deadlines)", ["shard"],
    multiprocess_mode="livemax",
)  # fmt: skip
SHARD_BYTES = Gauge(
    "dsgw_redis_shard_memory_bytes", "Estimated Redis memory of each shard's keys (MEMORY USAGE)", ["shard"],
    multiprocess_mode="livemax",
)  # fmt: skip


def tag_of(key: str) -> str | None:
    """The hash tag of a key, braces included (Redis's rule: first {...}, non-empty)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start : end + 1] if start >= 0 and end > start + 1 else None


async def _gathered(calls: list[Any]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(calls), CHUNK):
        out += await asyncio.gather(*calls[i : i + CHUNK], return_exceptions=True)
    return out


async def collect_cluster(mux: Any, shards: int = SHARDS) -> dict[int, tuple[int, int]]:
    from redis.crc import key_slot

    slots = [key_slot(tag[1:-1].encode()) for tag in shard_tags(shards)]
    keys = [feed_key(shard, shards) for shard in range(shards)]  # routes each command to its slot's node
    counts = await _gathered(
        [
            mux.execute("CLUSTER", "COUNTKEYSINSLOT", slot, key=key)
            for slot, key in zip(slots, keys, strict=True)
        ]
    )
    samples = await _gathered(
        [
            mux.execute("CLUSTER", "GETKEYSINSLOT", slot, SAMPLE_KEYS, key=key)
            for slot, key in zip(slots, keys, strict=True)
        ]
    )
    sizes = await _gathered(
        [
            mux.execute("MEMORY", "USAGE", k, key=k.decode() if isinstance(k, bytes) else k)
            for sample in samples
            if isinstance(sample, list)
            for k in sample
        ]
    )
    stats: dict[int, tuple[int, int]] = {}
    position = 0
    for shard, (count, sample) in enumerate(zip(counts, samples, strict=True)):
        if isinstance(count, BaseException) or isinstance(sample, BaseException):
            continue
        measured = [s for s in sizes[position : position + len(sample)] if isinstance(s, int)]
        position += len(sample)
        mean = sum(measured) / len(measured) if measured else 0
        stats[shard] = (int(count), int(count * mean))
    return stats


async def collect_standalone(client: Any, shards: int = SHARDS) -> dict[int, tuple[int, int]]:
    by_tag = shard_of_tag(shards)
    totals = [[0, 0] for _ in range(shards)]
    cursor = 0
    while True:
        cursor, batch = await client.scan(cursor, count=1000)
        owned = []
        for raw in batch:
            key = raw.decode() if isinstance(raw, bytes) else raw
            tag = tag_of(key)
            shard = by_tag.get(tag) if tag else None
            if shard is not None:
                owned.append((shard, raw))
        if owned:
            pipe = client.pipeline(transaction=False)
            for _, raw in owned:
                pipe.memory_usage(raw)
            for (shard, _), size in zip(owned, await pipe.execute(raise_on_error=False), strict=True):
                totals[shard][0] += 1
                totals[shard][1] += size if isinstance(size, int) else 0
        if not cursor:
            break
    return {shard: (keys, size) for shard, (keys, size) in enumerate(totals)}


async def collect(target: Any) -> dict[int, tuple[int, int]]:
    if target.cluster:
        return await collect_cluster(target.mux)
    return await collect_standalone(target.client)


async def refresh_once(target: Any, interval_s: float) -> bool:
    """Collect if this process holds the lease; copy the stored stats into
    the gauges either way. True when this process collected."""
    client = target.client
    collected = False
    if await client.set(SHARD_STATS_LEASE, os.getpid(), nx=True, px=max(1, int(interval_s * 1000 * 0.9))):
        stats = await collect(target)
        if stats:
            await client.hset(SHARD_STATS, mapping={str(s): f"{k} {b}" for s, (k, b) in stats.items()})
        collected = True
    stored = await client.hgetall(SHARD_STATS)
    for raw_shard, raw_value in stored.items():
        shard = raw_shard.decode() if isinstance(raw_shard, bytes) else str(raw_shard)
        keys, size = (raw_value.decode() if isinstance(raw_value, bytes) else raw_value).split()
        SHARD_KEYS.labels(shard).set(int(keys))
        SHARD_BYTES.labels(shard).set(int(size))
    return collected


async def shard_stats_forever(target: Any, interval_s: float) -> None:
    while True:
        try:
            await refresh_once(target, interval_s)
        except (RedisError, OSError) as exc:
            log.warning("shard stats failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)
