"""`dsgw worker sink`: stream -> Postgres.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import NoScriptError, RedisError

from gateway.json_messages import json_array_elements
from gateway.keys import SHARDS, feed_key
from gateway.layout import LayoutMismatch, check_layout
from gateway.offsets import format_offset, parse_entry_id
from gateway.redis_client import reset_after
from gateway.scripts import script_source

from .process import Backoff, Health
from .settings import WorkerSettings
from .tiering import HISTORY_ROWS, HistoryRow, Trimmer, history_rows, last_id

log = logging.getLogger("dsgw.sink")

GROUP = "dsgw-sink"
CLAIM_EVERY_S = 5.0
TRIM_EVERY_S = 2.0
SINK_READ = script_source("sink_read")

ROWS = Counter("dsgw_sink_rows_total", "Messages written to session_events (conflicts included)")
REJECTED = Counter("dsgw_sink_rejected_total", "Messages Postgres refused, kept in session_events_rejected")
LAG = Histogram(
    "dsgw_sink_lag_seconds",
    "From the append in Redis to the commit in Postgres, per feed shard",
    ["shard"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PENDING = Gauge("dsgw_sink_pending_entries", "Feed entries delivered but not yet acknowledged", ["shard"])

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


@dataclass(slots=True)
class FeedEntry:
    id: bytes
    fields: dict[bytes, bytes]

    def record(self) -> EntryRecord:
        """Its row of dsgw_sink_entries (KeyError, UnicodeDecodeError: unreadable)."""
        return self.fields[b"stream"].decode(), self.fields[b"ids"].decode(), self.fields[b"json"]

    @property
    def messages(self) -> int:
        return self.fields[b"ids"].count(b" ") + 1


def feed_entries(raw: list[Any]) -> list[FeedEntry]:
    """Entries from XREADGROUP (redis-py: (id, dict)) or sink_read.lua (flat field lists)."""
    entries = []
    for entry_id, fields in raw:
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        entries.append(FeedEntry(entry_id, fields))
    return entries


IDLE_FIRST_S = 0.005  # first back-off of a shard found empty; doubles up to DSGW_SINK_BLOCK_MS
ROUND_S = 0.005  # shortest pause between poll rounds (shards due within it share the round)
POLL_CHUNK = 512  # commands per pipeline
PROBE_ENTRIES = 100  # budget of a read of a shard that was idle
PROBE_BYTES = 64 * 1024
MAX_IN_FLIGHT_PER_WRITER = 2  # full batches read ahead per writer


@dataclass(slots=True)
class _ShardState:
    """What the poller knows of one shard's feed."""

    key: str
    due: float = 0.0  # monotonic time of its next read
    idle_s: float = 0.0  # its back-off while idle
    error_s: float = 0.0  # its back-off after a failed batch
    claim_due: float = 0.0  # when to look for stale entries again
    busy: bool = False  # a batch of it is queued or being written
    active: bool = False  # its last read had entries: read a full batch next
    group_ready: bool = False
    # Acknowledged entries since its last trim (at start: maybe, by an earlier sink).
    dirty: bool = True


def _trim_point(groups: list[dict[str, Any]], summary: dict[str, Any] | None) -> tuple[int, int] | None:
    """The MINID below which a feed holds only acknowledged entries."""
    group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
    if group is None:
        return None
    if summary and summary["pending"]:
        min_id = parse_entry_id(summary["min"])
    else:
        last = parse_entry_id(group["last-delivered-id"])
        min_id = (last[0], last[1] + 1)
    return min_id if min_id > (0, 1) else None


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
        self.trimmer = Trimmer(
            redis, settings.retain_messages, settings.retain_seconds, settings.trim_sweep_ms / 1000, GROUP
        )

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
        """One poller and DSGW_SINK_WRITERS writers, whatever the shard count.

        The poller reads the feeds of every due shard in one pipelined round
        (redis-py pipelines: one connection per Redis node), never blocking:
        a shard found empty is read again after a back-off that doubles from
        IDLE_FIRST_S up to DSGW_SINK_BLOCK_MS, which is therefore the bound on
        how late the sink notices the first append to an idle shard. A shard
        that had entries is read again as soon as its batch is written. A
        shard's batches are written one at a time, in order, by the writers
        (each holds one Postgres connection); at most MAX_IN_FLIGHT_PER_WRITER
        full batches per writer are read ahead, so memory stays bounded too.
        """
        log.info("sink started", extra={"fields": {"consumer": self.consumer, "shards": SHARDS}})
        self._shards = [_ShardState(feed_key(shard)) for shard in range(SHARDS)]
        self._batches: asyncio.Queue[tuple[int, list[FeedEntry]] | None] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._sink_read_sha = ""
        writers = [asyncio.create_task(self._writer()) for _ in range(max(1, self.settings.sink_writers))]
        try:
            await self._poll_loop()
        finally:
            for _ in writers:  # after the batches already read: they are written and acknowledged
                self._batches.put_nowait(None)
            await asyncio.gather(*writers, return_exceptions=True)
        log.info("sink stopped", extra={"fields": {"consumer": self.consumer}})

    async def _poll_loop(self) -> None:
        backoff = Backoff()
        last_trim = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                await self._poll_round(now)
                if now - last_trim >= TRIM_EVERY_S:
                    last_trim = now
                    await self._trim_dirty()
                backoff.reset()
            except (RedisError, OSError) as exc:
                log.warning("sink cannot reach redis: %s: %s", type(exc).__name__, exc)
                await reset_after(self.redis, exc)
                await backoff.wait(self.stop)
                continue
            except Exception:
                # A bug must not end the sink: log it, back off, try again
                # (undelivered entries stay in the feed, delivered ones pending).
                log.exception("sink poll round failed")
                await backoff.wait(self.stop)
                continue
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        now = time.monotonic()
        # A shard waiting for room for a full batch is woken by its writer, not the clock.
        room = self.settings.sink_writers * MAX_IN_FLIGHT_PER_WRITER > self._in_flight
        due = min((s.due for s in self._shards if not s.busy and (room or not s.active)), default=now + 1.0)
        # At least ROUND_S between rounds, so shards falling due one by one
        # share a round (one pipeline) instead of one round trip each.
        delay = min(max(due - now, ROUND_S), self.settings.sink_block_ms / 1000)
        self._wake.clear()
        stop = asyncio.ensure_future(self.stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait([stop, wake], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        wake.cancel()

    def _due_reads(self, now: float) -> list[tuple[int, bool, bool]]:
        """(shard, full budget, claim) for every shard to read this round."""
        reads = []
        room = self.settings.sink_writers * MAX_IN_FLIGHT_PER_WRITER - self._in_flight
        for shard, state in enumerate(self._shards):
            # An idle shard may be read a quarter of its back-off early: idle shards
            # then share rounds instead of each costing a round of its own.
            if state.busy or state.due > now + max(ROUND_S, state.idle_s / 4):
                continue
            if state.active:  # had entries: a full batch, if there is room for one
                if room <= 0:
                    continue
                room -= 1
            reads.append((shard, state.active, now >= state.claim_due))
        return reads

    async def _poll_round(self, now: float) -> None:
        reads = self._due_reads(now)
        if not reads:
            return
        await self._ensure_groups([shard for shard, _, _ in reads if not self._shards[shard].group_ready])
        if not self._sink_read_sha:
            self._sink_read_sha = await self.redis.script_load(SINK_READ)
        replies = await self._pipelined(
            [
                (
                    "EVALSHA", self._sink_read_sha, 1, self._shards[shard].key, GROUP, self.consumer,
                    *self._budget(full), self.settings.sink_claim_idle_ms if claim else "",
                )
                for shard, full, claim in reads
            ]
        )  # fmt: skip
        for (shard, _full, claim), reply in zip(reads, replies, strict=True):
            self._after_read(shard, claim, reply, now)

    def _budget(self, full: bool) -> tuple[int, int]:
        """(entries, bytes) of a read: a shard seen idle is probed with a small
        budget, so a round over many shards holds little at once."""
        entries, size = max(1, self.settings.sink_batch), max(1, self.settings.sink_batch_bytes)
        return (entries, size) if full else (min(entries, PROBE_ENTRIES), min(size, PROBE_BYTES))

    def _after_read(self, shard: int, claim: bool, reply: Any, now: float) -> None:
        state = self._shards[shard]
        if isinstance(reply, Exception):
            if isinstance(reply, NoScriptError):
                self._sink_read_sha = ""  # the node restarted or failed over: load it again
            elif "NOGROUP" in str(reply):
                state.group_ready = False  # the feed key was deleted: recreate the group
            else:
                log.warning("sink read of %s failed: %s: %s", state.key, type(reply).__name__, reply)
                state.due = now + 1.0
            return
        entries = feed_entries(reply or [])
        if claim:
            # Claim again next round while stale entries turn up, else in CLAIM_EVERY_S.
            state.claim_due = now if entries else now + CLAIM_EVERY_S
            if entries:
                log.info(
                    "claimed stale entries", extra={"fields": {"feed": state.key, "count": len(entries)}}
                )
        if entries:
            state.busy = state.active = True
            self._in_flight += 1
            self._batches.put_nowait((shard, entries))
        elif not claim:
            state.active = False
            state.idle_s = min(self.settings.sink_block_ms / 1000, max(IDLE_FIRST_S, state.idle_s * 2))
            state.due = now + state.idle_s
            self.last_progress[shard] = now

    async def _writer(self) -> None:
        while (item := await self._batches.get()) is not None:
            shard, entries = item
            state = self._shards[shard]
            try:
                await self._process(shard, state.key, entries)
                self.last_progress[shard] = time.monotonic()
                state.dirty = True
                state.idle_s = state.due = 0.0  # read it again at once
                state.error_s = 0.0
            except Exception as exc:
                # Not acknowledged: the entries stay pending and are claimed
                # again. Back off this shard only; the others go on.
                if isinstance(exc, RedisError | OSError):
                    log.warning("sink cannot reach redis: %s: %s", type(exc).__name__, exc)
                    await reset_after(self.redis, exc)
                else:
                    log.exception("sink shard %d failed", shard)
                state.error_s = min(5.0, max(0.1, state.error_s * 2))
                state.due = time.monotonic() + state.error_s
                state.claim_due = 0.0
            finally:
                state.busy = False
                self._in_flight -= 1
                self._wake.set()

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies (or exceptions) of `commands`, sent POLL_CHUNK at a time
        through one pipeline (a cluster pipeline: one connection per node)."""
        replies: list[Any] = []
        for start in range(0, len(commands), POLL_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for command in commands[start : start + POLL_CHUNK]:
                pipe.execute_command(*command)
            replies.extend(await pipe.execute(raise_on_error=False))
        return replies

    async def _ensure_groups(self, shards: list[int]) -> None:
        if not shards:
            return
        keys = [self._shards[shard].key for shard in shards]
        replies = await self._pipelined([("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM") for key in keys])
        for shard, reply in zip(shards, replies, strict=True):
            if not isinstance(reply, Exception) or "BUSYGROUP" in str(reply):
                self._shards[shard].group_ready = True

    async def _trim_dirty(self) -> None:
        """Drop acknowledged feed entries of the shards that acknowledged any
        since the last trim: everything below the oldest pending entry (or,
        with nothing pending, everything delivered so far)."""
        shards = [shard for shard, state in enumerate(self._shards) if state.dirty]
        if not shards:
            return
        for shard in shards:
            self._shards[shard].dirty = False
        replies: list[Any] = []
        for start in range(0, len(shards), POLL_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for shard in shards[start : start + POLL_CHUNK]:
                pipe.xinfo_groups(self._shards[shard].key)
                pipe.xpending(self._shards[shard].key, GROUP)
            replies.extend(await pipe.execute(raise_on_error=False))
        trims: list[tuple[Any, ...]] = []
        for i, shard in enumerate(shards):
            groups, summary = replies[2 * i], replies[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(summary, Exception):
                continue
            PENDING.labels(str(shard)).set(summary["pending"] if summary else 0)
            min_id = _trim_point(groups, summary)
            if min_id is not None:
                trims.append(("XTRIM", self._shards[shard].key, "MINID", f"{min_id[0]}-{min_id[1]}"))
        if trims:
            await self._pipelined(trims)

    async def _process(self, shard: int, key: str, entries: list[FeedEntry]) -> None:
        readable: list[tuple[FeedEntry, EntryRecord]] = []
        unreadable: list[tuple[FeedEntry, str]] = []
        # Tiered entries ('lens'): their stream_history rows, and per stream
        # the newest entry ID this batch commits (for meta synced and trimming).
        history: list[HistoryRow] = []
        synced: dict[str, tuple[bytes, bytes]] = {}
        for entry in entries:
            try:
                tiered = b"lens" in entry.fields
                rows = history_rows(entry.fields) if tiered else []
                # A tiered entry of a stream outside DSGW_SINK_STREAMS carries
                # 'data', not 'json': stream_history only.
                if not tiered or b"json" in entry.fields:
                    readable.append((entry, entry.record()))
                if tiered:
                    history.extend(rows)
                    synced[rows[0][0]] = (entry.id, last_id(entry.fields))
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
                log.warning("sink cannot write to postgres: %s: %s", type(exc).__name__, exc)
                if self.stop.is_set():
                    return
                await backoff.wait(self.stop)
        await self.redis.xack(key, GROUP, *[entry.id for entry in entries])
        now = time.time()
        lag = LAG.labels(str(shard))
        for entry, _ in readable:
            lag.observe(max(0.0, now - parse_entry_id(entry.id)[0] / 1000))
        ROWS.inc(sum(entry.messages for entry, _ in readable))
        HISTORY_ROWS.inc(len(history))
        # Committed: now, and only now, Redis may let these entries go.
        await self.trimmer.committed(key, synced)

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
