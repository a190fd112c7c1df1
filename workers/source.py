"""`dsgw worker source`: Postgres -> stream, and `dsgw publish` / `unpublish`.

Triggers on published tables write every committed INSERT, UPDATE and DELETE
into `dsgw_outbox`, numbered in commit order (see workers/sql/002). The source
worker appends them, one Postgres transaction per append, to the table's
stream as STATE-PROTOCOL change messages, then deletes them from the outbox.

Exactly once: each append carries `Stream-Seq` = the transaction's first
commit_seq, zero-padded. If the worker dies after an append but before it
deleted the rows, the retry is refused by the stream (Stream-Seq not above the
last one) and the rows are deleted then: appended once, never twice, never
lost. Only one source worker is active at a time (a Postgres advisory lock);
others wait as standbys, so commit order stays stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from datetime import UTC

import asyncpg
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from gateway.protocol import JSON_MEDIA_TYPE, ProblemError
from gateway.store import Store

from .process import Backoff
from .settings import WorkerSettings

log = logging.getLogger("dsgw.source")

LEADER_LOCK = 7352002
CHANNEL = "dsgw_outbox"

CHANGES = Counter("dsgw_source_changes_total", "Row changes appended to streams")
SKIPPED = Counter("dsgw_source_skipped_total", "Row changes a stream refused (closed or deleted)")
LAG = Histogram(
    "dsgw_source_lag_seconds",
    "From the Postgres commit to the append in Redis",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

FETCH_TRANSACTION = """
SELECT commit_seq, stream, table_name, row_key, operation, value::text AS value,
       old_value::text AS old_value, txid, committed_at
  FROM dsgw_outbox
 WHERE commit_seq IS NOT NULL AND txid = $1
 ORDER BY commit_seq
"""

FETCH = """
SELECT commit_seq, stream, table_name, row_key, operation, value::text AS value,
       old_value::text AS old_value, txid, committed_at
  FROM dsgw_outbox
 WHERE commit_seq IS NOT NULL
 ORDER BY commit_seq
 LIMIT $1
"""


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


def stream_seq(commit_seq: int) -> str:
    return f"{commit_seq:020d}"


Append = tuple[str, list[asyncpg.Record]]


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


class SourceWorker:
    def __init__(self, settings: WorkerSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.leader = False
        self.last_progress = time.monotonic()
        self._created: set[str] = set()

    def healthy(self) -> bool:
        return time.monotonic() - self.last_progress < 60

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
            log.info("source is the active publisher")
            await conn.add_listener(CHANNEL, lambda *_: self.wake.set())
            while not self.stop.is_set():
                self.wake.clear()
                published = await self._publish_batch(conn)
                self.last_progress = time.monotonic()
                if not published:
                    with contextlib.suppress(TimeoutError):
                        # NOTIFY wakes us at once; the timeout covers a lost one.
                        await asyncio.wait_for(self.wake.wait(), 1.0)
        finally:
            self.leader = False
            with contextlib.suppress(Exception):
                await conn.close()

    async def _publish_batch(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(FETCH, self.settings.source_batch)
        if not rows:
            return 0
        if len(rows) == self.settings.source_batch:
            # The last transaction may go on past the batch: it waits for the
            # next round, or, when it is the only one, is fetched whole.
            last_txid = rows[-1]["txid"]
            complete = [r for r in rows if r["txid"] != last_txid]
            rows = complete or await conn.fetch(FETCH_TRANSACTION, last_txid)
        published = 0
        for transaction in transactions_of(rows):
            for stream, group in transaction:
                await self._append(stream, group)
                published += len(group)
            last = max(r["commit_seq"] for _, group in transaction for r in group)
            async with conn.transaction():
                await conn.execute("DELETE FROM dsgw_outbox WHERE commit_seq <= $1", last)
                for stream, _ in transaction:
                    await conn.execute(
                        "INSERT INTO dsgw_source_progress (stream, last_seq) VALUES ($1, $2)"
                        " ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq",
                        stream,
                        last,
                    )
        return published

    async def _ensure_stream(self, stream: str) -> None:
        if stream in self._created:
            return
        await self.store.create_json_stream(stream)
        self._created.add(stream)

    async def _append(self, stream: str, rows: list[asyncpg.Record]) -> None:
        """Append one transaction's changes to one stream, exactly once."""
        messages = [change_message(r) for r in rows]
        seq = stream_seq(rows[0]["commit_seq"])
        for attempt in (1, 2):
            await self._ensure_stream(stream)
            try:
                outcome = await self.store.append(stream, JSON_MEDIA_TYPE, messages, stream_seq=seq)
                break
            except ProblemError as exc:  # 404 / 410: deleted or expired since we created it
                self._created.discard(stream)
                if attempt == 2 or exc.status != 404:
                    log.warning(
                        "stream refused changes", extra={"fields": {"stream": stream, "status": exc.status}}
                    )
                    SKIPPED.inc(len(rows))
                    return
        if outcome.status == "ok":
            CHANGES.inc(len(rows))
            now = time.time()
            for r in rows:
                LAG.observe(max(0.0, now - r["committed_at"].timestamp()))
        elif outcome.status == "seq_conflict":
            log.info("changes were appended before a restart", extra={"fields": {"stream": stream}})
        else:
            SKIPPED.inc(len(rows))
            log.warning(
                "stream refused changes", extra={"fields": {"stream": stream, "status": outcome.status}}
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
    from gateway.redis_client import connect
    from gateway.settings import Settings

    target = await connect(
        settings.redis_url, max_connections=8, pool_timeout_s=30, name=f"dsgw-source-{settings.consumer_name}"
    )
    # The gateways' live readers listen with SSUBSCRIBE on Redis 7: publish the same way.
    store = Store(target.mux, publish_command=target.publish_command, sink_filter=Settings.from_env().sink_filter)
    try:
        await serve_until_stopped(SourceWorker(settings, store), settings)
    finally:
        await target.close()
