"""What `dsgw streams`, `dsgw info` and `dsgw tail` show: read straight from
Redis, the same keys a user would look at with redis-cli."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from .keys import META_SCAN_PATTERN, name_from_meta_key, stream_keys
from .offsets import ZERO_ID, EntryId, format_offset, parse_entry_id
from .protocol import sse_needs_base64
from .store import Store, parse_meta


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def list_streams(redis: Redis, limit: int = 10_000) -> list[dict[str, Any]]:
    """One row per stream: name, content type, messages, bytes, closed, TTL."""
    rows = []
    async for key in redis.scan_iter(match=META_SCAN_PATTERN, count=1000):
        name = name_from_meta_key(_text(key))
        if name is None:
            continue
        keys = stream_keys(name)
        pipe = redis.pipeline(transaction=False)
        pipe.hgetall(keys.meta)
        pipe.xlen(keys.data)
        raw, length = await pipe.execute()
        if not raw:
            continue
        m = {_text(k): _text(v) for k, v in raw.items()}
        rows.append(
            {
                "name": name,
                "content_type": m.get("ct", ""),
                "messages": length,
                "bytes": int(m.get("bytes", 0)),
                "closed": m.get("closed") == "1",
                "ttl": int(m["ttl"]) if "ttl" in m else None,
                "expires_at": m.get("exp_raw"),
                "deleted": m.get("deleted") == "1",
                "forked_from": m.get("src"),
            }
        )
        if len(rows) >= limit:
            break
    return sorted(rows, key=lambda r: r["name"])


async def stream_info(redis: Redis, name: str) -> dict[str, Any] | None:
    keys = stream_keys(name)
    raw = await redis.hgetall(keys.meta)
    if not raw:
        return None
    m = {_text(k): _text(v) for k, v in raw.items()}
    meta = parse_meta([x for kv in raw.items() for x in kv])
    producers = []
    for pid, state in (await redis.hgetall(keys.producers)).items():
        epoch, seq, updated = (_text(state).split(" ") + ["", "", ""])[:3]
        producers.append(
            {"id": _text(pid), "epoch": int(epoch), "seq": int(seq), "updated_ms": int(updated or 0)}
        )
    forks = sorted(_text(f) for f in await redis.smembers(keys.forks))
    return {
        "name": name,
        "content_type": meta.content_type,
        "tail_offset": meta.tail_offset,
        "messages": await redis.xlen(keys.data),
        "bytes": int(m.get("bytes", 0)),
        "closed": meta.closed,
        "deleted": m.get("deleted") == "1",
        "ttl": meta.ttl,
        "expires_at": meta.expires_at,
        "created_ms": int(m.get("created", 0)),
        "forked_from": meta.source,
        "fork_offset": format_offset(meta.fork_offset) if meta.fork_offset else None,
        "forks": forks,
        "producers": sorted(producers, key=lambda p: p["id"]),
        "stream_seq": m.get("sseq"),
        "synced_to_postgres": m.get("sink") == "1",
        "sink": await shard_sink_lag(redis, keys.feed) if m.get("sink") == "1" else None,
        "keys": {"meta": keys.meta, "data": keys.data, "producers": keys.producers, "feed": keys.feed},
    }


async def shard_sink_lag(redis: Redis, feed: str) -> dict[str, Any]:
    """The sink's backlog on this stream's shard: entries not yet acknowledged
    (delivered or not) and the age of the oldest one."""
    from workers.sink import GROUP  # the group name lives with the worker

    try:
        groups = await redis.xinfo_groups(feed)
    except Exception:
        return {"feed": feed, "group": None}
    group = next((g for g in groups if _text(g["name"]) == GROUP), None)
    if group is None:
        return {"feed": feed, "group": None, "backlog": await redis.xlen(feed)}
    last = _text(group["last-delivered-id"])
    undelivered: list[Any] = await redis.xrange(feed, f"({last}", "+", count=1) or []
    summary = await redis.xpending(feed, GROUP)
    oldest: EntryId | None = None
    if summary and summary["pending"]:
        oldest = parse_entry_id(summary["min"])
    elif undelivered:
        oldest = parse_entry_id(undelivered[0][0])
    backlog = summary["pending"] if summary else 0
    if undelivered:
        backlog += len(await redis.xrange(feed, f"({last}", "+", count=100_000) or [])
    age_ms = int(time.time() * 1000) - oldest[0] if oldest else 0
    return {"feed": feed, "group": GROUP, "backlog": backlog, "oldest_age_ms": max(0, age_ms)}


def render_payload(payload: bytes, json_mode: bool, media_type: str) -> str:
    if json_mode or not sse_needs_base64(media_type):
        return payload.decode(errors="replace")
    return base64.b64encode(payload).decode()


async def tail(
    redis: Redis, name: str, after: EntryId = ZERO_ID, follow: bool = False
) -> AsyncIterator[tuple[str, str]]:
    """(offset, message text) pairs from `after` on; with `follow`, waits for more."""
    store = Store(redis)
    keys = stream_keys(name)
    while True:
        result = await store.read(name, after, touch=False, max_bytes=1 << 20, max_entries=1000)
        for entry in result.entries:
            yield (
                format_offset(entry.id),
                render_payload(entry.payload, result.meta.json, result.meta.media_type),
            )
        after = result.next_id
        if result.up_to_date:
            if not follow or result.closed_at_end:
                return
            # Block on the data key itself until something arrives (or 5 s pass).
            await redis.xread({keys.data: f"{after[0]}-{after[1]}"}, block=5000, count=1)
