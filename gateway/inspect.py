"""What `dsgw streams`, `dsgw info` and `dsgw tail` show: read straight from
Redis, the same keys a user would look at with redis-cli."""

from __future__ import annotations

import base64
import collections
import enum
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .keys import META_SCAN_PATTERN, name_from_meta_key, stream_keys
from .offsets import ZERO_ID, EntryId, format_offset, parse_entry_id
from .protocol import sse_needs_base64
from .redis_client import RedisTarget
from .settings import Settings
from .store import Store
from .store_model import StreamMeta, parse_meta
from .tiering.history import History


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
        **tier_ranges(meta, m.get("synced")),
        "sink": await shard_sink_lag(redis, keys.feed) if m.get("sink") == "1" else None,
        "keys": {"meta": keys.meta, "data": keys.data, "producers": keys.producers, "feed": keys.feed},
    }


def tier_ranges(meta: StreamMeta, synced: str | None) -> dict[str, Any]:
    """Where a stream's messages are (tiered history, issue 11), as offset
    ranges (from, to]: reading from `from` returns the range's first message.
    hot: still in Redis, after the trim point; cold: trimmed from Redis, read
    from Postgres stream_history (None while nothing was trimmed)."""
    hot_from = meta.trim or meta.base
    return {
        "hot_range": {"from": format_offset(hot_from), "to": meta.tail_offset},
        "cold_range": {"from": format_offset(meta.base), "to": format_offset(meta.trim)}
        if meta.trim
        else None,
        "synced_offset": format_offset(parse_entry_id(synced)) if synced else None,
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


class Kind(enum.StrEnum):
    """How `dsgw tail` shows a message."""

    JSON = "json"  # a JSON stream's message: its JSON text
    TEXT = "text"  # a text stream's append, as text
    BASE64 = "base64"  # any other append, base64 of its bytes


@dataclass(frozen=True)
class Message:
    offset: str
    text: str
    kind: Kind

    def ndjson(self) -> str:
        """One line of JSON: {"offset", "message"} with a JSON message as a JSON value
        (its digits kept as sent), other messages as strings."""
        if self.kind is Kind.JSON:
            # A JSON text holds raw line breaks only between tokens (inside
            # strings they are escaped), so this keeps it one valid line.
            value = self.text.replace("\r", " ").replace("\n", " ")
        else:
            value = json.dumps(self.text)
        encoding = ',"encoding":"base64"' if self.kind is Kind.BASE64 else ""
        return f'{{"offset":"{self.offset}","message":{value}{encoding}}}'


def to_message(entry_id: EntryId, payload: bytes, json_mode: bool, media_type: str) -> Message:
    if json_mode:
        kind = Kind.JSON
    elif sse_needs_base64(media_type):
        kind = Kind.BASE64
    else:
        kind = Kind.TEXT
    text = base64.b64encode(payload).decode() if kind is Kind.BASE64 else payload.decode(errors="replace")
    return Message(format_offset(entry_id), text, kind)


# `tail`'s start for "only messages appended from now on".
NOW = "now"


async def _start_of_last(target: RedisTarget, store: Store, name: str, meta: StreamMeta, n: int) -> EntryId:
    """The offset after which the stream's last `n` messages come."""
    if n == 0:
        return meta.tail
    # Usually the stream's own data key holds them: one XREVRANGE.
    newest = await target.client.xrevrange(stream_keys(name).data, count=n + 1)
    if len(newest) == n + 1:
        return parse_entry_id(newest[-1][0])
    if not meta.source and meta.trim is None:
        return ZERO_ID
    # A fork with fewer own messages, or a stream whose older messages left
    # Redis (tiered history): walk its whole history.
    window: collections.deque[EntryId] = collections.deque(maxlen=n + 1)
    after = ZERO_ID
    while True:
        _, entries = await store.read_entries(name, after, limit=1000)
        if not entries:
            break
        window.extend(e.id for e in entries)
        after = entries[-1].id
    return window[0] if len(window) == n + 1 else ZERO_ID


async def tail(
    target: RedisTarget,
    name: str,
    start: EntryId | str = ZERO_ID,
    *,
    follow: bool = False,
    last: int | None = None,
) -> AsyncIterator[Message]:
    """The messages after `start` (an offset, or NOW), or the `last` N; with
    `follow`, waits for more until the stream is closed."""
    store = Store(target.mux)
    settings = Settings.from_env()
    if settings.history_database_url:
        # Messages trimmed from Redis come from Postgres (tiered history).
        store.history = History(
            settings.history_database_url, timeout_s=settings.history_timeout_ms / 1000, max_connections=1
        )
    try:
        async for message in _tail(target, store, name, start, follow, last):
            yield message
    finally:
        if store.history:
            await store.history.close()


async def _tail(
    target: RedisTarget, store: Store, name: str, start: EntryId | str, follow: bool, last: int | None
) -> AsyncIterator[Message]:
    keys = stream_keys(name)
    meta, _ = await store.read_entries(name, ZERO_ID, limit=0)  # 404/410 for a missing stream
    if last is not None:
        after = await _start_of_last(target, store, name, meta, last)
    elif start == NOW:
        after = meta.tail
    else:
        assert isinstance(start, tuple)
        after = start
    while True:
        meta, entries = await store.read_entries(name, after, limit=1000)
        for entry in entries:
            yield to_message(entry.id, entry.payload, meta.json, meta.media_type)
            after = entry.id
        if not entries or after >= meta.tail:
            if not follow or meta.closed:
                return
            # Block on the data key itself until something arrives, for less than
            # the client's read timeout (redis-py's default is 5 s).
            await target.client.xread({keys.data: f"{after[0]}-{after[1]}"}, block=1000, count=1)
