"""`dsgw worker source`: Postgres -> stream, and `dsgw publish` / `unpublish`.

Triggers on published tables write every committed INSERT, UPDATE and DELETE
into `dsgw_outbox`, numbered in commit order (commit_seq, see workers/sql/002).
The source worker appends them to the table's stream as STATE-PROTOCOL change
messages, one append per transaction and stream, then deletes them from the
outbox. A transaction bigger than DSGW_SOURCE_MAX_APPEND_MESSAGES changes (or
_BYTES) becomes several appends in order: an append is one Lua script, and
Redis runs nothing else meanwhile.

Exactly once: each append carries the commit_seq of its last change as the
stream's *source sequence* (meta srcseq), which only this worker sets (an HTTP
client's Stream-Seq cannot make the worker skip anything). A worker that died
after an append but before deleting its rows finds, on restart, the stream's
source sequence at or above those rows: they were appended, and are deleted
without being appended again.

Numbers that go backwards (a restored backup, a failover to a logical replica,
a reset sequence) must not pass for old changes. Before appending, the worker
writes to Postgres the highest commit_seq it hands to an append for each
stream (dsgw_source_progress.appending_seq, workers/sql/004). A stream whose
source sequence is above that, or outbox rows at or below the stream's last
published commit_seq, mean the numbers were reused: the worker stops
publishing that stream and keeps its rows, logs an ERROR, counts it in
dsgw_source_sequence_conflicts_total and reports it in /healthz until an
operator runs dsgw_source_resync (docs/postgres.md, "Postgres → Stream").

Only one source worker is active at a time (a Postgres advisory lock); others
wait as standbys, so commit order stays stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from gateway.keys import stream_keys
from gateway.protocol import JSON_MEDIA_TYPE, ProblemError
from gateway.store import Store
from gateway.store_model import WriteOutcome
from gateway.stores import configured_store

from .process import Backoff, Health
from .settings import WorkerSettings

log = logging.getLogger("dsgw.source")

LEADER_LOCK = 7352002  # also taken by dsgw_source_resync (workers/sql/004)
CHANNEL = "dsgw_outbox"

CHANGES = Counter("dsgw_source_changes_total", "Row changes appended to streams")
SKIPPED = Counter("dsgw_source_skipped_total", "Row changes a stream refused (closed or deleted)")
CONFLICTS = Counter(
    "dsgw_source_sequence_conflicts_total",
    "Streams the source worker stopped publishing because commit numbers went backwards",
)
LAG = Histogram(
    "dsgw_source_lag_seconds",
    "From the Postgres commit to the append in Redis",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Streams in conflict ($2) are left out: their rows wait for the operator.
FETCH = """
SELECT commit_seq, stream, table_name, row_key, operation, value::text AS value,
       old_value::text AS old_value, txid, committed_at
  FROM dsgw_outbox
 WHERE commit_seq IS NOT NULL AND stream <> ALL($2::text[])
 ORDER BY commit_seq
 LIMIT $1
"""

FETCH_TRANSACTION = """
SELECT commit_seq, stream, table_name, row_key, operation, value::text AS value,
       old_value::text AS old_value, txid, committed_at
  FROM dsgw_outbox
 WHERE commit_seq IS NOT NULL AND txid = $1 AND stream <> ALL($3::text[])
 ORDER BY commit_seq
 LIMIT $2
"""

PROGRESS = "SELECT last_seq, appending_seq FROM dsgw_source_progress WHERE stream = $1"
RESERVE = (
    "INSERT INTO dsgw_source_progress (stream, last_seq, appending_seq) VALUES ($1, 0, $2)"
    " ON CONFLICT (stream) DO UPDATE"
    " SET appending_seq = greatest(dsgw_source_progress.appending_seq, excluded.appending_seq)"
)
PUBLISHED = (
    "INSERT INTO dsgw_source_progress (stream, last_seq, appending_seq) VALUES ($1, $2, $2)"
    " ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq"
)
DELETE_DONE = "DELETE FROM dsgw_outbox WHERE commit_seq <= $1 AND stream <> ALL($2::text[])"


def change_message(row: asyncpg.Record) -> str:
    """One STATE-PROTOCOL change message, as JSON text. The row's values are
    spliced in as Postgres wrote them (jsonb text), so numbers keep every digit."""
    committed = row["committed_at"].astimezone(UTC)
    headers = {
        "operation": row["operation"],
        "txid": str(row["txid"]),
        "timestamp": committed.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    parts = ['{"type":', json.dumps(row["table_name"]), ',"key":', json.dumps(row["row_key"])]
    if row["value"] is not None:
        parts += [',"value":', row["value"]]
    if row["old_value"] is not None:
        parts += [',"old_value":', row["old_value"]]
    parts += [',"headers":', json.dumps(headers, separators=(",", ":")), "}"]
    return "".join(parts)


def source_seq(commit_seq: int) -> str:
    """A stream's source sequence: fixed width, so byte order is number order."""
    return f"{commit_seq:020d}"


Append = tuple[str, list[asyncpg.Record]]
Change = tuple[asyncpg.Record, bytes]  # an outbox row and its message


def transactions_of(rows: list[asyncpg.Record]) -> list[list[Append]]:
    """Rows (in commit order; a transaction's rows are numbered together, so
    they are contiguous) as transactions, each a list of appends: one per
    stream it touched, in the order it first touched them."""
    transactions: list[list[Append]] = []
    current_txid = None
    by_stream: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        if row["txid"] != current_txid:
            current_txid, by_stream = row["txid"], {}
            transactions.append([])
        group = by_stream.get(row["stream"])
        if group is None:
            group = by_stream[row["stream"]] = []
            transactions[-1].append((row["stream"], group))
        group.append(row)
    return transactions


def next_append_size(changes: list[Change], max_messages: int, max_bytes: int) -> int:
    """How many of `changes` (from the first) go in one append: at least one,
    at most `max_messages`, and no more than `max_bytes` unless the first
    message alone is bigger."""
    size, max_messages = 0, max(1, max_messages)
    for i, (_, message) in enumerate(changes[:max_messages]):
        size += len(message)
        if size > max_bytes and i > 0:
            return i
    return min(len(changes), max_messages)


@dataclass
class StreamSequences:
    """The numbers of one stream the worker checks changes against."""

    published: int  # last_seq: changes up to it were appended and deleted
    appending: int  # appending_seq: the highest this database handed to an append
    stream: int | None  # the stream's source sequence in Redis (None: it has none)


class SourceWorker:
    def __init__(self, settings: WorkerSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.leader = False
        self.last_progress = time.monotonic()
        self._created: set[str] = set()
        # Known while this worker leads (another leader may have run before).
        self._sequences: dict[str, StreamSequences] = {}
        # Streams not published because their numbers went backwards: why, and
        # the number to pass to dsgw_source_resync. Kept until a restart.
        self.conflicts: dict[str, dict[str, Any]] = {}

    def health(self) -> Health:
        report: Health = {"status": "ok", "leader": self.leader}
        if time.monotonic() - self.last_progress >= 60:
            report.update(status="unhealthy", stalled=True)
        if self.conflicts:
            report.update(status="unhealthy", sequence_conflicts=self.conflicts)
        return report

    async def run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                await self._lead_and_publish()
                backoff.reset()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError, TimeoutError) as exc:
                log.warning("source interrupted: %s: %s", type(exc).__name__, exc)
                self.leader = False
                await backoff.wait(self.stop)

    async def _lead_and_publish(self) -> None:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            # Standby until this worker holds the leader lock.
            while not self.stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                    break
                self.last_progress = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 2.0)
            if self.stop.is_set():
                return
            self.leader = True
            self._sequences = {}
            log.info("source is the active publisher")
            await conn.add_listener(CHANNEL, lambda *_: self.wake.set())
            while not self.stop.is_set():
                self.wake.clear()
                handled = await self._publish_batch(conn)
                self.last_progress = time.monotonic()
                if not handled:
                    with contextlib.suppress(TimeoutError):
                        # NOTIFY wakes us at once; the timeout covers a lost one.
                        await asyncio.wait_for(self.wake.wait(), 1.0)
        finally:
            self.leader = False
            with contextlib.suppress(Exception):
                await conn.close()

    async def _publish_batch(self, conn: asyncpg.Connection) -> int:
        """One round: append up to DSGW_SOURCE_BATCH outbox rows, delete them;
        return how many rows it handled."""
        batch = self.settings.source_batch
        rows = await conn.fetch(FETCH, batch, list(self.conflicts))
        if not rows:
            return 0
        if len(rows) == batch:
            # The last transaction may go on past the batch: it waits for the
            # next round, or, when it is the only one, is loaded alone, in
            # slices (one append per stream when it fits one append).
            last_txid = rows[-1]["txid"]
            complete = [r for r in rows if r["txid"] != last_txid]
            limit = max(batch, self.settings.source_max_append_messages)
            rows = complete or await conn.fetch(FETCH_TRANSACTION, last_txid, limit, list(self.conflicts))
        rows = await self._without_conflicts(conn, rows)
        await self._reserve(conn, rows)
        for transaction in transactions_of(rows):
            for stream, group in transaction:
                if stream not in self.conflicts:
                    await self._append(stream, group)
            last = max(r["commit_seq"] for _, group in transaction for r in group)
            async with conn.transaction():
                await conn.execute(DELETE_DONE, last, list(self.conflicts))
                for stream, _ in transaction:
                    if stream not in self.conflicts:
                        await conn.execute(PUBLISHED, stream, last)
                        self._sequences[stream].published = last
        return len(rows) or 1

    async def _sequences_of(self, conn: asyncpg.Connection, stream: str) -> StreamSequences:
        known = self._sequences.get(stream)
        if known is None:
            row = await conn.fetchrow(PROGRESS, stream)
            meta = stream_keys(stream).meta
            stored = await self.store.mux.execute("HGET", meta, "srcseq", key=meta, retry_if_lost=True)
            known = self._sequences[stream] = StreamSequences(
                published=row["last_seq"] if row else 0,
                appending=row["appending_seq"] if row else 0,
                stream=int(stored) if stored else None,
            )
        return known

    async def _without_conflicts(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record]
    ) -> list[asyncpg.Record]:
        """Rows minus those of streams in conflict. Rows at or below their
        stream's last published number are reused numbers: that stream is in
        conflict from now on."""
        lowest: dict[str, int] = {}
        for r in rows:
            lowest.setdefault(r["stream"], r["commit_seq"])
        for stream, seq in lowest.items():
            sequences = await self._sequences_of(conn, stream)
            if seq <= sequences.published:
                self._conflict(
                    stream, f"outbox change {seq} is not above {sequences.published}, published before"
                )
        return [r for r in rows if r["stream"] not in self.conflicts]

    async def _reserve(self, conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        """Record, before appending, the highest commit_seq each stream may get."""
        highest: dict[str, int] = {}
        for r in rows:
            highest[r["stream"]] = r["commit_seq"]  # rows are in commit order
        todo = [(s, seq) for s, seq in highest.items() if seq > self._sequences[s].appending]
        if not todo:
            return
        async with conn.transaction():
            await conn.executemany(RESERVE, todo)
        for stream, seq in todo:
            self._sequences[stream].appending = seq

    async def _append(self, stream: str, rows: list[asyncpg.Record]) -> None:
        """Append one transaction's changes to one stream, exactly once, in
        appends of at most DSGW_SOURCE_MAX_APPEND_MESSAGES / _BYTES."""
        sequences = self._sequences[stream]
        changes: list[Change] = [(r, change_message(r).encode()) for r in rows]
        while changes:
            stored = sequences.stream
            if stored is not None and changes[0][0]["commit_seq"] <= stored:
                if stored > sequences.appending:
                    # This database never handed that number to an append.
                    self._conflict(
                        stream, f"the stream's source sequence {stored} is above {sequences.appending}"
                    )
                    return
                # Appended before the worker stopped, not yet deleted then.
                log.info("changes were appended before a restart", extra={"fields": {"stream": stream}})
                changes = [c for c in changes if c[0]["commit_seq"] > stored]
                continue
            size = next_append_size(
                changes, self.settings.source_max_append_messages, self.settings.source_max_append_bytes
            )
            part = changes[:size]
            outcome = await self._append_part(stream, part)
            if outcome is not None and outcome.status == "source_dup":
                sequences.stream = int(outcome.detail)  # another worker appended meanwhile
                continue
            if outcome is None or outcome.status != "ok":
                SKIPPED.inc(len(changes))
                log.warning(
                    "stream refused changes",
                    extra={"fields": {"stream": stream, "status": outcome.status if outcome else "missing"}},
                )
                return
            sequences.stream = part[-1][0]["commit_seq"]
            CHANGES.inc(len(part))
            now = time.time()
            for r, _ in part:
                LAG.observe(max(0.0, now - r["committed_at"].timestamp()))
            changes = changes[size:]

    async def _append_part(self, stream: str, part: list[Change]) -> WriteOutcome | None:
        """One append; None when the stream is gone and cannot be re-created."""
        seq = source_seq(part[-1][0]["commit_seq"])
        for attempt in (1, 2):
            await self._ensure_stream(stream)
            try:
                return await self.store.append(
                    stream, JSON_MEDIA_TYPE, [message for _, message in part], source_seq=seq
                )
            except ProblemError as exc:  # 404 / 410: deleted or expired since we created it
                self._created.discard(stream)
                self._sequences[stream].stream = None  # a new stream has no source sequence
                if attempt == 2 or exc.status != 404:
                    return None
        return None

    async def _ensure_stream(self, stream: str) -> None:
        if stream in self._created:
            return
        await self.store.create_json_stream(stream)
        self._created.add(stream)

    def _conflict(self, stream: str, reason: str) -> None:
        if stream in self.conflicts:
            return
        sequences = self._sequences[stream]
        resync_past = max(sequences.published, sequences.appending, sequences.stream or 0)
        self.conflicts[stream] = {
            "reason": reason,
            "stream_source_seq": sequences.stream,
            "published_seq": sequences.published,
            "appending_seq": sequences.appending,
            "resync_past": resync_past,
        }
        CONFLICTS.inc()
        log.error(
            "commit numbers went backwards: not publishing this stream, its changes stay in the outbox",
            extra={
                "fields": {
                    "stream": stream,
                    "reason": reason,
                    "recovery": f"stop every source worker, then SELECT dsgw_source_resync({resync_past})",
                }
            },
        )


# --- publish / unpublish -------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


TRIGGER = "dsgw_publish"  # one per published table (trigger names are per table)


async def primary_key_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = $1::regclass AND i.indisprimary"
        " ORDER BY array_position(i.indkey::int2[], a.attnum)",
        table,
    )
    return [r["attname"] for r in rows]


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def publish(conn: asyncpg.Connection, table: str, stream: str) -> list[str]:
    """Install the capture trigger on `table` (idempotent); return its key columns."""
    if not _IDENT.fullmatch(table):
        raise ValueError(f"not a table name: {table!r}")
    key_columns = await primary_key_columns(conn, table)
    if not key_columns:
        raise ValueError(f"{table} has no primary key: a change needs one as its key")
    args = ", ".join(_quote_literal(a) for a in [stream, table, *key_columns])
    async with conn.transaction():
        await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}")
        await conn.execute(
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {table}"
            f" FOR EACH ROW EXECUTE FUNCTION dsgw_capture({args})"
        )
        await conn.execute(
            "INSERT INTO dsgw_publications (table_name, stream, key_columns) VALUES ($1, $2, $3)"
            " ON CONFLICT (table_name) DO UPDATE SET stream = excluded.stream, key_columns = excluded.key_columns",
            table,
            stream,
            key_columns,
        )
    return key_columns


async def unpublish(conn: asyncpg.Connection, table: str) -> None:
    if not _IDENT.fullmatch(table):
        raise ValueError(f"not a table name: {table!r}")
    async with conn.transaction():
        await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}")
        await conn.execute("DELETE FROM dsgw_publications WHERE table_name = $1", table)


async def run_source(settings: WorkerSettings) -> None:
    from .migrate import migrate_url
    from .process import serve_until_stopped

    await migrate_url(settings.database_url)
    from gateway.layout import LayoutMismatch, check_layout
    from gateway.redis_client import connect
    from gateway.settings import Settings

    target = await connect(
        settings.redis_url, max_connections=8, pool_timeout_s=30, name=f"dsgw-source-{settings.consumer_name}"
    )
    try:
        await check_layout(target.client)  # it writes streams: only in the shard layout Redis holds
    except LayoutMismatch:
        await target.close()
        raise
    # The gateways' live readers listen with SSUBSCRIBE on Redis 7: publish the same way.
    store = configured_store(target.mux, target.publish_command, Settings.from_env())
    try:
        await serve_until_stopped(SourceWorker(settings, store), settings)
    finally:
        await target.close()
