"""`dsgw worker sink`: stream -> Postgres. This module writes (feed entries
to rows, Postgres transactions, rejects) and runs the worker; which feeds are
read, when, and within which memory budget is workers/sink_poll.py.

Every shard's sync feed (dsfeed:{sNN}, written by the append script) is read
by the consumer group `dsgw-sink`; any number of sink processes join it and
Redis spreads the entries over them. A batch is written in one Postgres
transaction and acknowledged (XACK) only after the commit. So:

- a crash before the commit leaves the entries pending: another sink (or this
  one, restarted) takes them over once they have been idle for
  DSGW_SINK_CLAIM_IDLE_MS, and writes them;
- a crash between commit and XACK makes the batch arrive again: the unique
  constraint on (stream_name, ds_offset) turns the second write into nothing.

Hence exactly one row per message. Acknowledged feed entries are trimmed.

A batch is bounded by entries (DSGW_SINK_BATCH) and by bytes
(DSGW_SINK_BATCH_BYTES): gateway/lua/sink_read.lua measures entries inside
Redis and delivers only those that fit, both for new entries and for entries
taken over, so big messages never exhaust a sink or come back forever.

Python parses no JSON on the way: each feed entry (one append: its entry IDs
and its messages as one JSON array) is copied as it is into a temporary
table, and one INSERT ... SELECT splits the arrays into rows in Postgres. When
Postgres refuses a batch for its data, the batch is halved until the refused
entries are alone; those are written message by message, and the messages
Postgres refuses go to session_events_rejected. A poison message never blocks
the entries behind it.

Tiered streams (retention on; workers/tiering.py): their feed entries carry
the messages' lengths, and every message also becomes a stream_history row
(its bytes as stored in Redis) in the same transaction. After the commit the
sink records meta `synced` and trims Redis to the retention, never above it.
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
from prometheus_client import Counter
from redis.exceptions import RedisError

from gateway.json_messages import json_array_elements
from gateway.keys import SHARDS
from gateway.layout import LayoutMismatch, check_layout
from gateway.offsets import format_offset, parse_entry_id
from gateway.redis_client import reset_after

from .process import Backoff, Health
from .settings import WorkerSettings
from .sink_poll import GROUP, LAG, SINK_READ, Batch, FeedEntry, ShardPoller, feed_entries
from .tiering import HISTORY_ROWS, HistoryRow, Trimmer, history_rows, last_id

__all__ = [
    "GROUP",
    "SINK_READ",
    "FeedEntry",
    "SinkWorker",
    "feed_entries",
    "rows_from_feed_entry",
    "run_sink",
]

log = logging.getLogger("dsgw.sink")

ROWS = Counter("dsgw_sink_rows_total", "Messages written to session_events (conflicts included)")
REJECTED = Counter("dsgw_sink_rejected_total", "Messages Postgres refused, kept in session_events_rejected")

# Feed entries as they are: the stream, the entry IDs (space-separated), and
# the messages as one JSON array (bytes, decoded by Postgres).
ENTRIES_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS dsgw_sink_entries"
    " (stream_name text, ids text, messages bytea) ON COMMIT DELETE ROWS"
)
# One row per message. The subquery parses each array once (OFFSET 0 keeps
# the planner from inlining it); an entry whose IDs and messages do not pair
# up fails (jsonb_array_elements of a scalar) rather than losing messages.
# ds_offset and received_at come from the entry ID, as in gateway/offsets.py;
# key, type and operation from the message or its headers (workers/sql/004).
INSERT_FROM_ENTRIES = """
INSERT INTO session_events
       (stream_name, event_key, event_type, operation, payload, ds_offset, received_at)
SELECT e.stream_name,
       dsgw_event_field(m.value, 'key'),
       dsgw_event_field(m.value, 'type'),
       dsgw_event_field(m.value, 'operation'),
       m.value,
       lpad(split_part(e.ids[m.n], '-', 1), 16, '0') || '_' || lpad(split_part(e.ids[m.n], '-', 2), 16, '0'),
       to_timestamp(split_part(e.ids[m.n], '-', 1)::bigint / 1000.0)
  FROM (SELECT stream_name, string_to_array(ids, ' ') AS ids,
               convert_from(messages, 'UTF8')::jsonb AS messages
          FROM dsgw_sink_entries OFFSET 0) e
 CROSS JOIN LATERAL jsonb_array_elements(
           CASE WHEN jsonb_array_length(e.messages) = cardinality(e.ids) THEN e.messages
                ELSE to_jsonb('feed entry IDs and messages do not pair up'::text) END
       ) WITH ORDINALITY AS m(value, n)
    ON CONFLICT (stream_name, ds_offset) DO NOTHING
"""
# Message by message (the entries Postgres refused as a whole). STAGE_DDL and
# INSERT_FROM_STAGE write such rows in bulk: e2e/bench_sync.py's baseline.
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
# Tiered streams: every message's bytes as stored in Redis (workers/sql/005).
HISTORY_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS dsgw_sink_history"
    " (stream_name text, ds_offset text, more integer, data bytea) ON COMMIT DELETE ROWS"
)
INSERT_HISTORY = "INSERT INTO stream_history SELECT * FROM dsgw_sink_history ON CONFLICT DO NOTHING"
INSERT_REJECTED = (
    "INSERT INTO session_events_rejected (stream_name, ds_offset, raw, error)"
    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
)

Row = tuple[str, str | None, str | None, str | None, str, str, datetime]


# Errors that retrying cannot fix: the data itself is refused (by Postgres,
# e.g. a \u0000 or a lone surrogate escape in jsonb, a key too long for an
# index, a feed entry whose IDs and messages do not pair up; or by the
# driver, e.g. a string it cannot encode).
def is_unavailable(exc: asyncpg.PostgresError) -> bool:
    """Postgres is going away, starting, or out of resources (SQLSTATE classes
    08, 53, 57, 58): not a refusal of any particular batch."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in ("08", "53", "57", "58")


DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
    asyncpg.UntranslatableCharacterError,
    asyncpg.CharacterNotInRepertoireError,
    asyncpg.IntegrityConstraintViolationError,
    UnicodeError,
)


def _text_field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        headers = obj.get("headers")
        value = headers.get(name) if isinstance(headers, dict) else None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def rows_from_feed_entry(fields: dict[bytes, bytes]) -> list[Row]:
    """The session_events rows of one feed entry (one append), parsed in
    Python: the path for entries Postgres refused as a whole. The payload is
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


EntryRecord = tuple[str, str, bytes]


class SinkWorker:
    """The poller (workers/sink_poll.py) and DSGW_SINK_WRITERS writers, each
    holding one Postgres connection and writing the batches queued when it
    looks (one or several shards') in one transaction."""

    def __init__(self, settings: WorkerSettings, redis: aioredis.Redis, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.consumer = settings.consumer_name
        self.stop = asyncio.Event()
        self.poller = ShardPoller(settings, redis, self.consumer, self.stop)
        self.trimmer = Trimmer(
            redis, settings.retain_messages, settings.retain_seconds, settings.trim_sweep_ms / 1000, GROUP
        )

    def stalled_shards(self) -> list[int]:
        return self.poller.stalled_shards()

    def health(self) -> Health:
        stalled = self.stalled_shards()
        if stalled:
            return {"status": "unhealthy", "stalled_shards": stalled}
        return {"status": "ok"}

    async def run(self) -> None:
        log.info("sink started", extra={"fields": {"consumer": self.consumer, "shards": SHARDS}})
        writers = [asyncio.create_task(self._writer()) for _ in range(max(1, self.settings.sink_writers))]
        try:
            await self.poller.run()
        finally:
            for _ in writers:  # after the batches already read: they are written and acknowledged
                self.poller.batches.put_nowait(None)
            await asyncio.gather(*writers, return_exceptions=True)
        log.info("sink stopped", extra={"fields": {"consumer": self.consumer}})

    async def _writer(self) -> None:
        while (first := await self.poller.batches.get()) is not None:
            batches, stopping = self._merge_queued(first)
            try:
                await self._handle(batches, retry=len(batches) == 1)
            except asyncpg.PostgresError as exc:
                # Postgres refused the merged batches, not for their data (those
                # are set aside inside): find whose they are by writing each
                # alone once, so the others go on; the refused ones are then
                # retried in place, holding back only their own shards.
                log.warning("sink cannot write merged batches: %s: %s; writing them one by one",
                            type(exc).__name__, exc)  # fmt: skip
                refused = []
                for batch in batches:
                    try:
                        await self._handle([batch], retry=False)
                    except asyncpg.PostgresError:
                        refused.append(batch)
                for batch in refused:
                    await self._handle([batch], retry=True)
            if stopping:
                return

    async def _handle(self, batches: list[Batch], *, retry: bool) -> None:
        """Write and acknowledge `batches`, and tell the poller how it went.
        Without `retry`, a refusal by the Postgres server (not about the data)
        is raised, with nothing reported."""
        try:
            lags = await self._process(batches, retry=retry)
        except Exception as exc:
            if isinstance(exc, asyncpg.PostgresError) and not retry:
                raise  # the caller writes these batches one by one
            if isinstance(exc, RedisError | OSError):
                log.warning("sink cannot reach redis: %s: %s", type(exc).__name__, exc)
                await reset_after(self.redis, exc)
            else:
                log.exception("sink shards %s failed", [batch.shard for batch in batches])
            for batch in batches:
                self.poller.failed(batch)
            return
        for batch, lag_s in zip(batches, lags, strict=True):
            self.poller.written(batch, lag_s)

    def _merge_queued(self, first: Batch) -> tuple[list[Batch], bool]:
        """`first` and the batches already queued behind it, up to about one
        batch's bounds (DSGW_SINK_BATCH entries, DSGW_SINK_BATCH_BYTES): with
        many shards each read finds a few entries, and one transaction for all
        of them costs what one costs for one. True if the end-of-work marker
        was taken (this writer stops after these)."""
        batches = [first]
        entries, size = len(first.entries), first.size
        queue = self.poller.batches
        while (
            not queue.empty() and entries < self.settings.sink_batch and size < self.settings.sink_batch_bytes
        ):
            batch = queue.get_nowait()
            if batch is None:
                return batches, True
            batches.append(batch)
            entries, size = entries + len(batch.entries), size + batch.size
        return batches, False

    async def _process(self, batches: list[Batch], *, retry: bool) -> list[float]:
        """Write these batches (one or several shards) in one transaction and
        acknowledge them; per batch, its oldest entry's lag (seconds). With
        `retry`, go on trying while Postgres is down or refuses; without, a
        refusal by the server is raised (an unreachable Postgres is still waited
        for: it refuses everyone alike)."""
        readable: list[tuple[FeedEntry, EntryRecord]] = []
        unreadable: list[tuple[FeedEntry, str]] = []
        # Tiered entries ('lens'): their stream_history rows, and per shard
        # feed and stream the newest entry ID this batch commits (for meta
        # synced and trimming).
        history: list[HistoryRow] = []
        synced: dict[str, dict[str, tuple[bytes, bytes]]] = {batch.key: {} for batch in batches}
        for batch in batches:
            for entry in batch.entries:
                try:
                    tiered = b"lens" in entry.fields
                    rows = history_rows(entry.fields) if tiered else []
                    # A tiered entry of a stream outside DSGW_SINK_STREAMS carries
                    # 'data', not 'json': stream_history only.
                    if not tiered or b"json" in entry.fields:
                        readable.append((entry, entry.record()))
                    if tiered:
                        history.extend(rows)
                        synced[batch.key][rows[0][0]] = (entry.id, last_id(entry.fields))
                except (KeyError, ValueError, UnicodeDecodeError) as exc:
                    unreadable.append((entry, f"{type(exc).__name__}: {exc}"))
        backoff = Backoff()
        while True:
            try:
                await self._write(readable, unreadable, history)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                # Postgres is down or restarting, or refuses the batch for a
                # reason other than its data: keep the batch, try again (the
                # shard's /healthz turns 503 if this lasts). The entries stay
                # pending, so a SIGTERM now loses nothing either.
                if not retry and isinstance(exc, asyncpg.PostgresError) and not is_unavailable(exc):
                    raise
                log.warning("sink cannot write to postgres: %s: %s", type(exc).__name__, exc)
                if self.stop.is_set():
                    return [0.0] * len(batches)  # not acknowledged: the entries stay pending
                await backoff.wait(self.stop)
        pipe = self.redis.pipeline(transaction=False)
        for batch in batches:
            pipe.xack(batch.key, GROUP, *[entry.id for entry in batch.entries])
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply  # not acknowledged: written again later, and the second write is nothing
        now = time.time()

        def lag(entry: FeedEntry) -> float:
            return max(0.0, now - parse_entry_id(entry.id)[0] / 1000)

        for entry, _ in readable:
            LAG.observe(lag(entry))
        ROWS.inc(sum(entry.messages for entry, _ in readable))
        HISTORY_ROWS.inc(len(history))
        # Committed: now, and only now, Redis may let these entries go.
        await self.trimmer.committed_many(list(synced.items()))
        return [max(map(lag, batch.entries), default=0.0) for batch in batches]

    async def _write(
        self,
        entries: list[tuple[FeedEntry, EntryRecord]],
        unreadable: list[tuple[FeedEntry, str]],
        history: list[HistoryRow] | None = None,
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(ENTRIES_DDL)
            if history:
                # Same transaction as session_events: "committed" means both.
                await conn.execute(HISTORY_DDL)
                await conn.copy_records_to_table("dsgw_sink_history", records=history)
                await conn.execute(INSERT_HISTORY)
            await self._write_entries(conn, entries, alone=True)
            for entry, error in unreadable:
                await self._reject_entry(conn, entry, error)

    async def _write_entries(
        self, conn: asyncpg.Connection, entries: list[tuple[FeedEntry, EntryRecord]], *, alone: bool
    ) -> None:
        """Write `entries` in bulk; if Postgres refuses them for their data,
        halve them until the refused entries are alone, and write those
        message by message. `alone`: nothing else was staged in this
        transaction (else the staged entries are cleared after use)."""
        if not entries:
            return
        try:
            async with conn.transaction():  # a savepoint: a refusal undoes only this
                await conn.copy_records_to_table("dsgw_sink_entries", records=[r for _, r in entries])
                await conn.execute(INSERT_FROM_ENTRIES)
                if not alone:
                    await conn.execute("TRUNCATE dsgw_sink_entries")
        except DATA_ERRORS:
            if len(entries) == 1:
                await self._write_messages(conn, entries[0][0])
                return
            half = len(entries) // 2
            await self._write_entries(conn, entries[:half], alone=False)
            await self._write_entries(conn, entries[half:], alone=False)

    async def _write_messages(self, conn: asyncpg.Connection, entry: FeedEntry) -> None:
        """An entry Postgres refused: write message by message, keeping refused ones aside."""
        try:
            rows = rows_from_feed_entry(entry.fields)
        except (KeyError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            await self._reject_entry(conn, entry, f"{type(exc).__name__}: {exc}")
            return
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

    async def _reject_entry(self, conn: asyncpg.Connection, entry: FeedEntry, error: str) -> None:
        """A feed entry that cannot even be split into messages: kept whole."""
        REJECTED.inc()
        fields = entry.fields
        stream = fields.get(b"stream", b"?").decode(errors="replace")
        raw = json.dumps({k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()})
        await conn.execute(INSERT_REJECTED, stream, f"feed:{entry.id.decode()}", raw.encode(), error)


async def run_sink(settings: WorkerSettings) -> None:
    from .migrate import migrate_url
    from .process import serve_until_stopped

    await migrate_url(settings.database_url)
    from gateway.redis_client import connect

    target = await connect(
        settings.redis_url,
        # The poller's pipeline, one per writer (acknowledgements), spares:
        # bounded whatever the shard count.
        max_connections=settings.sink_writers + 4,
        pool_timeout_s=30,
        name=f"dsgw-sink-{settings.consumer_name}",
    )
    redis = target.client
    try:
        await check_layout(redis)  # the feeds of another shard layout are not ours to read
    except LayoutMismatch:
        await target.close()
        raise
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=max(1, settings.sink_writers)
    )
    worker = SinkWorker(settings, redis, pool)
    # One task for every shard: idle streams age out, waiting streams get recorded.
    tiering = settings.retain_seconds is not None or settings.retain_messages is not None
    sweep = asyncio.create_task(worker.trimmer.sweep_loop(worker.stop)) if tiering else None
    try:
        await serve_until_stopped(worker, settings)
    finally:
        if sweep:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep
        await pool.close()
        await target.close()
