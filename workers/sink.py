"""`dsgw worker sink`: stream -> Postgres.

Every shard's sync feed (dsfeed:{sNN}, written by the append script) is read
by the consumer group `dsgw-sink`; any number of sink processes join it and
Redis spreads the entries over them. A batch is written in one Postgres
transaction (COPY into a temporary table, then INSERT ... ON CONFLICT DO
NOTHING on (stream_name, ds_offset)) and acknowledged (XACK) only after the
commit. So:

- a crash before the commit leaves the entries pending: another sink (or this
  one, restarted) takes them over with XAUTOCLAIM once they have been idle for
  DSGW_SINK_CLAIM_IDLE_MS, and writes them;
- a crash between commit and XACK makes the batch arrive again: the unique
  constraint turns the second write into nothing.

Hence exactly one row per message. Acknowledged feed entries are trimmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError, ResponseError

from gateway.keys import SHARDS, feed_key
from gateway.offsets import format_offset, parse_entry_id
from gateway.protocol import json_array_elements
from gateway.redis_client import reset_after

from .process import Backoff, Health
from .settings import WorkerSettings

log = logging.getLogger("dsgw.sink")

GROUP = "dsgw-sink"
CLAIM_EVERY_S = 5.0
TRIM_EVERY_S = 2.0

ROWS = Counter("dsgw_sink_rows_total", "Messages written to session_events (conflicts included)")
REJECTED = Counter("dsgw_sink_rejected_total", "Messages Postgres refused, kept in session_events_rejected")
LAG = Histogram(
    "dsgw_sink_lag_seconds",
    "From the append in Redis to the commit in Postgres, per feed shard",
    ["shard"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PENDING = Gauge("dsgw_sink_pending_entries", "Feed entries delivered but not yet acknowledged", ["shard"])

STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS dsgw_sink_stage ("
    " stream_name text, event_key text, event_type text, operation text,"
    " payload jsonb, ds_offset text, received_at timestamptz) ON COMMIT DELETE ROWS"
)
INSERT_FROM_STAGE = (
    "INSERT INTO session_events"
    " (stream_name, event_key, event_type, operation, payload, ds_offset, received_at)"
    " SELECT * FROM dsgw_sink_stage ON CONFLICT (stream_name, ds_offset) DO NOTHING"
)
INSERT_ONE = (
    "INSERT INTO session_events"
    " (stream_name, event_key, event_type, operation, payload, ds_offset, received_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (stream_name, ds_offset) DO NOTHING"
)
INSERT_REJECTED = (
    "INSERT INTO session_events_rejected (stream_name, ds_offset, raw, error)"
    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
)

Row = tuple[str, str | None, str | None, str | None, str, str, datetime]

# Errors that retrying cannot fix: the data itself is refused (by Postgres,
# e.g. a \u0000 or a lone surrogate escape in jsonb, a key too long for an
# index; or by the driver, e.g. a string it cannot encode).
DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
    asyncpg.UntranslatableCharacterError,
    asyncpg.CharacterNotInRepertoireError,
    UnicodeError,
)


def _text_field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def rows_from_feed_entry(fields: dict[bytes, bytes]) -> list[Row]:
    """The session_events rows of one feed entry (one append). The payload is
    each message's JSON text as appended, so numbers keep every digit."""
    stream = fields[b"stream"].decode()
    ids = fields[b"ids"].split()
    messages = json_array_elements(fields[b"json"].decode())
    if len(ids) != len(messages):
        raise ValueError(f"feed entry has {len(ids)} ids for {len(messages)} messages")
    rows: list[Row] = []
    for raw_id, (text, message) in zip(ids, messages, strict=True):
        entry_id = parse_entry_id(raw_id)
        obj = message if isinstance(message, dict) else {}
        rows.append(
            (
                stream,
                _text_field(obj, "key"),
                _text_field(obj, "type"),
                _text_field(obj, "operation"),
                text,
                format_offset(entry_id),
                datetime.fromtimestamp(entry_id[0] / 1000, UTC),
            )
        )
    return rows


class SinkWorker:
    def __init__(self, settings: WorkerSettings, redis: aioredis.Redis, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.consumer = settings.consumer_name
        self.stop = asyncio.Event()
        # Per shard: when its loop last finished a round (a read, with or
        # without entries, and their write). One stuck shard is enough to
        # make the worker unhealthy, whatever the others do.
        self.last_progress = [time.monotonic()] * SHARDS

    def stalled_shards(self) -> list[int]:
        limit = (self.settings.sink_stall_ms + self.settings.sink_block_ms) / 1000
        now = time.monotonic()
        return [shard for shard, at in enumerate(self.last_progress) if now - at >= limit]

    def health(self) -> Health:
        stalled = self.stalled_shards()
        if stalled:
            return {"status": "unhealthy", "stalled_shards": stalled}
        return {"status": "ok"}

    async def run(self) -> None:
        log.info("sink started", extra={"fields": {"consumer": self.consumer, "shards": SHARDS}})
        await asyncio.gather(*(self._shard_loop(shard) for shard in range(SHARDS)))
        log.info("sink stopped", extra={"fields": {"consumer": self.consumer}})

    async def _ensure_group(self, key: str) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)

    async def _shard_loop(self, shard: int) -> None:
        key = feed_key(shard)
        backoff = Backoff()
        last_claim = last_trim = 0.0
        group_ready = False
        while not self.stop.is_set():
            try:
                if not group_ready:
                    await self._ensure_group(key)
                    group_ready = True
                now = time.monotonic()
                entries: list[Any] = []
                if now - last_claim > CLAIM_EVERY_S:
                    last_claim = now
                    entries = await self._claim(key)
                if not entries:
                    reply: Any = await self.redis.xreadgroup(
                        GROUP,
                        self.consumer,
                        {key: ">"},
                        count=self.settings.sink_batch,
                        block=self.settings.sink_block_ms,
                    )
                    entries = reply[0][1] if reply else []
                if entries:
                    await self._process(shard, key, entries)
                if now - last_trim > TRIM_EVERY_S:
                    last_trim = now
                    await self._trim(shard, key)
                self.last_progress[shard] = time.monotonic()
                backoff.reset()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    group_ready = False  # the feed key was deleted: recreate the group
                else:
                    log.warning("sink redis error: %s: %s", type(exc).__name__, exc)
                    await reset_after(self.redis, exc)
                await backoff.wait(self.stop)
            except (RedisError, OSError) as exc:
                log.warning("sink cannot reach redis: %s: %s", type(exc).__name__, exc)
                await reset_after(self.redis, exc)
                await backoff.wait(self.stop)
            except Exception:
                # A bug must not take the other shards down: log it, back off,
                # and try again (the batch stays pending, so nothing is lost).
                log.exception("sink shard %d failed", shard)
                await backoff.wait(self.stop)

    async def _claim(self, key: str) -> list[Any]:
        """Take over entries another consumer left unacknowledged for too long."""
        reply = await self.redis.xautoclaim(
            key,
            GROUP,
            self.consumer,
            min_idle_time=self.settings.sink_claim_idle_ms,
            start_id="0-0",
            count=self.settings.sink_batch,
        )
        claimed = reply[1] if reply else []
        if claimed:
            log.info("claimed stale entries", extra={"fields": {"feed": key, "count": len(claimed)}})
        return claimed

    async def _process(self, shard: int, key: str, entries: list[Any]) -> None:
        rows: list[Row] = []
        unreadable: list[tuple[bytes, dict[bytes, bytes] | None, str]] = []
        for entry_id, fields in entries:
            if not fields:
                continue  # trimmed or deleted while pending: nothing to write
            try:
                rows.extend(rows_from_feed_entry(fields))
            except (KeyError, ValueError, UnicodeDecodeError, RecursionError) as exc:
                unreadable.append((entry_id, fields, str(exc)))
        backoff = Backoff()
        while True:
            try:
                await self._write(rows, unreadable)
                break
            except DATA_ERRORS:
                await self._write_one_by_one(rows, unreadable)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                # Postgres is down or restarting: keep the batch, try again. The
                # entries stay pending, so a SIGTERM now loses nothing either.
                log.warning("sink cannot write to postgres: %s", exc)
                if self.stop.is_set():
                    return
                await backoff.wait(self.stop)
        await self.redis.xack(key, GROUP, *[entry_id for entry_id, _ in entries])
        now = time.time()
        lag = LAG.labels(str(shard))
        for row in rows:
            lag.observe(max(0.0, now - row[6].timestamp()))
        ROWS.inc(len(rows))

    async def _write(self, rows: list[Row], unreadable: list[tuple[bytes, Any, str]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if rows:
                await conn.execute(STAGE_DDL)
                await conn.copy_records_to_table("dsgw_sink_stage", records=rows)
                await conn.execute(INSERT_FROM_STAGE)
            for entry_id, fields, error in unreadable:
                await self._reject(conn, fields, entry_id, error)

    async def _write_one_by_one(self, rows: list[Row], unreadable: list[tuple[bytes, Any, str]]) -> None:
        """A batch Postgres refused: write row by row, keeping refused rows aside."""
        async with self.pool.acquire() as conn, conn.transaction():
            for row in rows:
                try:
                    async with conn.transaction():
                        await conn.execute(INSERT_ONE, *row)
                except DATA_ERRORS as exc:
                    REJECTED.inc()
                    log.warning(
                        "postgres refused a message",
                        extra={"fields": {"stream": row[0], "ds_offset": row[5]}},
                    )
                    raw = row[4].encode("utf-8", "surrogatepass")
                    await conn.execute(INSERT_REJECTED, row[0], row[5], raw, str(exc))
            for entry_id, fields, error in unreadable:
                await self._reject(conn, fields, entry_id, error)

    async def _reject(self, conn: asyncpg.Connection, fields: Any, entry_id: bytes, error: str) -> None:
        REJECTED.inc()
        stream = (fields or {}).get(b"stream", b"?").decode(errors="replace")
        raw = json.dumps(
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (fields or {}).items()}
        )
        await conn.execute(INSERT_REJECTED, stream, f"feed:{entry_id.decode()}", raw.encode(), error)

    async def _trim(self, shard: int, key: str) -> None:
        """Drop acknowledged entries: everything below the oldest pending one
        (or, with nothing pending, everything delivered so far)."""
        groups = await self.redis.xinfo_groups(key)
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:
            return
        last = parse_entry_id(group["last-delivered-id"])
        summary = await self.redis.xpending(key, GROUP)
        pending = summary["pending"] if summary else 0
        PENDING.labels(str(shard)).set(pending)
        if pending:
            min_id = parse_entry_id(summary["min"])
        else:
            min_id = (last[0], last[1] + 1)
        if min_id > (0, 1):
            await self.redis.xtrim(key, minid=f"{min_id[0]}-{min_id[1]}")


async def run_sink(settings: WorkerSettings) -> None:
    from .migrate import migrate_url
    from .process import serve_until_stopped

    await migrate_url(settings.database_url)
    from gateway.redis_client import connect

    target = await connect(
        settings.redis_url,
        # One blocking read per shard plus room for acks and trims.
        max_connections=SHARDS * 2 + 4,
        pool_timeout_s=30,
        name=f"dsgw-sink-{settings.consumer_name}",
    )
    redis = target.client
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        await serve_until_stopped(SinkWorker(settings, redis, pool), settings)
    finally:
        await pool.close()
        await redis.aclose()
