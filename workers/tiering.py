"""Tiered history, writing side (issue 11): what the sink does for tiered
streams (meta `tier`, every append in the sync feed with its messages'
lengths).

- `history_rows` splits a feed entry into its stream_history rows (one per
  message, its bytes exactly as stored in Redis);
- after each commit, `Trimmer.committed` runs gateway/lua/trim.lua for every
  stream of the batch, in one pipeline: it raises meta `synced` and trims
  Redis to DSGW_RETAIN_MESSAGES / DSGW_RETAIN_SECONDS, never above `synced`;
- `Trimmer.sweep_loop` (one task per sink process, whatever the shard count)
  trims streams that stopped receiving appends once their oldest entry ages
  out: trim.lua keeps a per-shard ZSET (keys.trim_due_key) of when each
  stream is due, and one pipeline per round reads every shard's due streams,
  a second one trims them.

Trimming depends on nothing but `synced`: with Postgres down or the sink
lagging, `synced` stays where it is and so does the trim point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import NoScriptError, RedisError

from gateway.keys import SHARDS, stream_keys, trim_due_key
from gateway.offsets import format_offset, parse_entry_id
from gateway.scripts import script_sha, script_source

log = logging.getLogger("dsgw.tiering")


HISTORY_ROWS = Counter(
    "dsgw_sink_history_rows_total", "Messages written to stream_history (conflicts included)"
)
TRIMMED = Counter("dsgw_trim_entries_total", "Entries removed from Redis data streams by retention")
# Streams taken from one shard's schedule per sweep round (the rest wait a round).
SWEEP_BATCH = 500

HistoryRow = tuple[str, str, int, bytes]


def history_rows(fields: dict[bytes, bytes]) -> list[HistoryRow]:
    """The stream_history rows of one tiered feed entry (one append): the
    payload ('json': the messages joined by commas inside brackets; 'data':
    concatenated) cut by 'lens'. `more` counts the messages of the append
    after each one, as in the data stream. ValueError/KeyError: unreadable."""
    stream = fields[b"stream"].decode()
    ids = fields[b"ids"].split()
    lens = [int(n) for n in fields[b"lens"].split()]
    is_json = b"json" in fields
    payload = fields[b"json"] if is_json else fields[b"data"]
    separators = len(lens) + 1 if is_json else 0  # brackets and commas
    if len(ids) != len(lens) or sum(lens) + separators != len(payload):
        raise ValueError(f"feed entry lengths do not match its {len(ids)} ids and {len(payload)} bytes")
    rows: list[HistoryRow] = []
    pos = 1 if is_json else 0
    count = len(ids)
    for i, (raw_id, size) in enumerate(zip(ids, lens, strict=True)):
        rows.append((stream, format_offset(parse_entry_id(raw_id)), count - 1 - i, payload[pos : pos + size]))
        pos += size + (1 if is_json else 0)
    return rows


def last_id(fields: dict[bytes, bytes]) -> bytes:
    """The entry ID that ends the append of a feed entry."""
    return fields[b"ids"].rsplit(b" ", 1)[-1]


class Trimmer:
    def __init__(
        self,
        redis: aioredis.Redis,
        retain_messages: int | None,
        retain_seconds: int | None,
        sweep_every_s: float = 1.0,
        group: str = "dsgw-sink",
    ) -> None:
        self.redis = redis
        self.group = group  # the sink's consumer group: who has not acknowledged yet
        self.retention = (
            "" if retain_messages is None else str(retain_messages),
            "" if retain_seconds is None else str(retain_seconds),
        )
        self.sweep_every_s = sweep_every_s
        self._sha = script_sha("trim")
        # Per feed: streams committed but not yet recorded (see committed()).
        self._waiting: dict[str, dict[str, tuple[bytes, bytes]]] = {}

    async def committed(self, feed: str, synced: dict[str, tuple[bytes, bytes]]) -> None:
        await self.committed_many([(feed, synced)])

    async def committed_many(self, batches: list[tuple[str, dict[str, tuple[bytes, bytes]]]]) -> None:
        """Batches of one or several shards are committed: per shard feed and
        stream, (feed entry ID, newest entry ID). Record them and trim, one
        round trip for the feeds' pending summaries and one for all streams.

        Several sinks share a feed: an older feed entry of the same stream may
        still be pending with another consumer (not yet in Postgres). `synced`
        claims everything below it, so a stream is only recorded once every
        older feed entry is acknowledged; the others wait here until then
        (checked after the next batch of this shard, and by the sweep)."""
        feeds = []
        for feed, synced in batches:
            waiting = self._waiting.setdefault(feed, {})
            waiting.update(synced)
            if waiting:
                feeds.append(feed)
        if not feeds:
            return
        pipe = self.redis.pipeline(transaction=False)
        for feed in feeds:
            pipe.xpending(feed, self.group)
        summaries = await pipe.execute()
        ready: list[tuple[str, dict[str, tuple[bytes, bytes]]]] = []
        for feed, summary in zip(feeds, summaries, strict=True):
            oldest = parse_entry_id(summary["min"]) if summary and summary["pending"] else None
            waiting = self._waiting[feed]
            ready.append(
                (
                    feed,
                    {
                        name: ids
                        for name, ids in waiting.items()
                        if oldest is None or parse_entry_id(ids[0]) < oldest
                    },
                )
            )
        await self._trim([(name, ids[1].decode()) for _, streams in ready for name, ids in streams.items()])
        for feed, streams in ready:
            waiting = self._waiting[feed]
            for name, ids in streams.items():
                if waiting.get(name) == ids:  # not replaced by a newer batch meanwhile
                    del waiting[name]

    async def _trim(self, streams: list[tuple[str, str]]) -> None:
        if not streams:
            return
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            for name, entry_id in streams:
                keys = stream_keys(name)
                # execute_command, not pipe.evalsha: redis-py refuses evalsha in
                # cluster pipelines; EVALSHA by name is routed by its keys' slot.
                pipe.execute_command("EVALSHA", self._sha, 3, keys.meta, keys.data,
                                     trim_due_key(keys.shard), entry_id, *self.retention, name)  # fmt: skip
            results = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                # A new or restarted Redis: load the script, run the (idempotent) round again.
                await self.redis.script_load(script_source("trim"))
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
                TRIMMED.inc(int(result[1]))
            return

    async def sweep_once(self) -> int:
        """Trim every stream whose oldest entry is due to age out; how many were due."""
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrangebyscore(trim_due_key(shard), "-inf", now_ms, start=0, num=SWEEP_BATCH)
        due: list[tuple[str, str]] = []
        for names in await pipe.execute():
            due.extend((name.decode(), "") for name in names)
        await self._trim(due)
        return len(due)

    async def sweep_loop(self, stop: asyncio.Event) -> None:
        """One task for all shards: sweep, then wait a round (or stop)."""
        while not stop.is_set():
            try:
                for feed, waiting in list(self._waiting.items()):
                    if waiting:
                        await self.committed(feed, {})
                await self.sweep_once()
            except (RedisError, OSError) as exc:
                log.warning("trim sweep failed: %s: %s", type(exc).__name__, exc)
            except Exception:
                log.exception("trim sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sweep_every_s)
