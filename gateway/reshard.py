"""`dsgw reshard --to N`: move every stream to the shards of another shard
count. An OFFLINE migration: every gateway and worker stopped first (checked:
no `dsgw-gateway-*`, `dsgw-sink-*` or `dsgw-source-*` client may be connected),
and the sync feeds drained by the sink before it was stopped (checked: no feed
of the old layout may hold an entry the sink has not acknowledged).

A stream's keys change hash tag, hence slot, hence (on a cluster) node, so
neither RENAME nor COPY can move them. Each key is copied through this
process instead: DUMP (the value, byte for byte: stream entry IDs, producer
state, metadata, all as they were) and PTTL, RESTORE ... REPLACE under its
new name, then DEL of the old one, a batch of keys at a time (pipelined).
The per-shard ZSETs whose members are stream names (fork deadlines, trim
due times, subscription wake-ups) are re-filed member by member. The drained
feeds of the old layout are deleted; the sink creates the new ones.

Idempotent: LAYOUT_KEY says `resharding:<from>:<to>` for the whole run (so
no gateway starts on half-moved data), a key is deleted only after its copy
is written, and a rerun moves what is left (REPLACE overwrites a copy an
interrupted run already wrote). The layout becomes `<to>` only at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from .keys import (
    FEED_PREFIX,
    FORK_DEADLINES_PREFIX,
    LAYOUT_KEY,
    LEGACY_SHARDS,
    PREFIX,
    STREAM_KEYS_SCAN_PATTERN,
    TRIM_DUE_PREFIX,
    WAKE_QUEUE_PREFIX,
    layout_name,
    shard_of,
    shard_tag,
    shard_tags,
    split_stream_key,
)
from .layout import has_legacy_keys, recorded_layout

BATCH = 500  # keys per DUMP / RESTORE / DEL pipeline
# Per-shard ZSETs of stream names (member -> a time in ms).
NAME_ZSETS = (FORK_DEADLINES_PREFIX, TRIM_DUE_PREFIX, WAKE_QUEUE_PREFIX)
PROCESS_PREFIXES = ("dsgw-gateway-", "dsgw-sink-", "dsgw-source-")
SINK_GROUP = "dsgw-sink"


class ReshardError(Exception):
    """Refused: what is wrong, in one line."""


@dataclass
class ReshardReport:
    source: str
    target: str
    streams: int = 0  # streams moved (their :meta keys)
    keys: int = 0  # keys moved
    members: int = 0  # ZSET members re-filed
    seconds: float = 0.0


def shards_of_layout(layout: str) -> int:
    kind, _, count = layout.partition("-")
    if kind not in ("legacy", "balanced") or not count.isdigit():
        raise ReshardError(f"unknown shard layout {layout!r} in {LAYOUT_KEY}")
    return int(count)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _pipelined(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    replies: list[Any] = []
    for start in range(0, len(commands), BATCH):
        pipe = client.pipeline(transaction=False)
        for command in commands[start : start + BATCH]:
            pipe.execute_command(*command)
        replies.extend(await pipe.execute())
    return replies


async def connected_processes(client: Any) -> list[str]:
    """Names of the gateway and worker connections, on every node."""
    if isinstance(client, RedisCluster):
        reply: Any = await client.client_list(target_nodes=RedisCluster.PRIMARIES)
        # One list per node (a dict), or already merged into one list.
        clients = [c for node in reply.values() for c in node] if isinstance(reply, dict) else reply
    else:
        clients = await client.client_list()
    names = [_text(c.get("name", "")) for c in clients]
    return sorted({n for n in names if n.startswith(PROCESS_PREFIXES)})


async def undrained_feeds(client: Any, shards: int) -> list[str]:
    """Feeds of the layout holding entries the sink has not acknowledged."""
    found = []
    for shard in range(shards):
        key = f"{FEED_PREFIX}:{shard_tag(shard, shards)}"
        if not await client.exists(key):
            continue
        groups = {_text(g["name"]): g for g in await client.xinfo_groups(key)}
        group = groups.get(SINK_GROUP)
        if group is None:
            if await client.xlen(key):
                found.append(key)  # entries no sink ever read
            continue
        undelivered = await client.xrange(key, f"({_text(group['last-delivered-id'])}", "+", count=1)
        if group["pending"] or undelivered:
            found.append(key)
    return found


async def _source_layout(client: Any, to: int) -> str:
    recorded = await recorded_layout(client)
    if recorded is None:
        # Written before layouts were recorded: legacy, or nothing at all yet.
        return layout_name(LEGACY_SHARDS) if await has_legacy_keys(client) else layout_name(to)
    if recorded.startswith("resharding:"):
        _, source, target = recorded.split(":")
        if target != layout_name(to):
            raise ReshardError(
                f"an interrupted reshard from {source} to {target} must be finished first:"
                f" run `dsgw reshard --to {shards_of_layout(target)}`"
            )
        return source
    return recorded


async def reshard(
    client: Any,
    to: int,
    *,
    drop_feeds: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> ReshardReport:
    """Move every stream from the recorded layout to `to` shards."""
    started = time.monotonic()
    shard_tags(to)  # ValueError for a count out of range, before anything is written
    source = await _source_layout(client, to)
    target = layout_name(to)
    report = ReshardReport(source, target)
    if source == target:
        await client.set(LAYOUT_KEY, target)
        return report
    old = shards_of_layout(source)
    running = await connected_processes(client)
    if running:
        raise ReshardError(f"stop every gateway and worker first; connected: {', '.join(running)}")
    if not drop_feeds:
        feeds = await undrained_feeds(client, old)
        if feeds:
            raise ReshardError(
                f"{len(feeds)} sync feeds hold entries the sink has not acknowledged (e.g. {feeds[0]}):"
                " run the sink until they are drained, or pass --drop-feeds to discard them"
            )
    await client.set(LAYOUT_KEY, f"resharding:{source}:{target}")
    old_tags, new_tags = set(shard_tags(old)), set(shard_tags(to))

    batch: list[tuple[str, str]] = []
    async for raw in client.scan_iter(match=STREAM_KEYS_SCAN_PATTERN, count=1000):
        key = _text(raw)
        parts = split_stream_key(key)
        if parts is None:
            continue
        tag, name, suffix = parts
        new_tag = shard_tag(shard_of(name, to), to)
        if tag == new_tag or tag not in old_tags:
            continue  # in place already (moved by an interrupted run), or not a stream key of ours
        batch.append((key, f"{PREFIX}:{new_tag}:{name}:{suffix}"))
        if len(batch) >= BATCH:
            await _move(client, batch, report)
            progress(f"moved {report.keys} keys ({report.streams} streams)")
            batch = []
    await _move(client, batch, report)

    for prefix in NAME_ZSETS:
        for shard in range(old):
            report.members += await _refile_zset(client, f"{prefix}:{shard_tag(shard, old)}", prefix, to)
    for tag in old_tags - new_tags:
        await client.delete(f"{FEED_PREFIX}:{tag}")  # drained (or --drop-feeds)
    await client.set(LAYOUT_KEY, target)
    report.seconds = time.monotonic() - started
    return report


async def _move(client: Any, pairs: list[tuple[str, str]], report: ReshardReport) -> None:
    if not pairs:
        return
    dumped = await _pipelined(client, [cmd for old, _ in pairs for cmd in (("DUMP", old), ("PTTL", old))])
    restores, moved = [], []
    for i, (old, new) in enumerate(pairs):
        payload, ttl = dumped[2 * i], dumped[2 * i + 1]
        if payload is None:
            continue  # expired or deleted since the scan
        restores.append(("RESTORE", new, max(0, int(ttl)), payload, "REPLACE"))
        moved.append(old)
    # Every copy is written before any original goes: an interruption leaves
    # both, and the rerun copies again.
    await _pipelined(client, restores)
    await _pipelined(client, [("DEL", old) for old in moved])
    report.keys += len(moved)
    report.streams += sum(1 for old in moved if old.endswith(":meta"))


async def _refile_zset(client: Any, key: str, prefix: str, to: int) -> int:
    moved = 0
    async for member, score in client.zscan_iter(key, count=1000):
        name = _text(member)
        new_key = f"{prefix}:{shard_tag(shard_of(name, to), to)}"
        if new_key == key:
            continue
        await client.zadd(new_key, {name: score})
        await client.zrem(key, name)
        moved += 1
    return moved
