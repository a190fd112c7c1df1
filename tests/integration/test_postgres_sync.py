"""Stream <-> Postgres with real Postgres, real Redis, real gateway and worker
processes: exact counts, also after kills and outages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import redis

from gateway.keys import SHARDS, feed_key
from tests.conftest import WorkerProcess, start_worker, wait_until

JSON = {"content-type": "application/json"}
FAST_CLAIM = {"DSGW_SINK_CLAIM_IDLE_MS": "1500", "DSGW_SINK_BLOCK_MS": "200"}


@pytest.fixture
async def pg(postgres_server) -> AsyncIterator[asyncpg.Connection]:
    from workers.migrate import migrate

    conn = await asyncpg.connect(postgres_server.url)
    await migrate(conn)
    yield conn
    await conn.close()


@pytest.fixture
def sink(redis_server, postgres_server, tmp_path) -> Iterator[WorkerProcess]:
    worker = start_worker("sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM)
    yield worker
    worker.stop()


async def rows_of(pg: asyncpg.Connection, stream: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM session_events WHERE stream_name = $1 ORDER BY ds_offset", stream)


async def count_rows(pg: asyncpg.Connection, prefix: str) -> int:
    return await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name LIKE $1", prefix + "%")


async def test_every_message_becomes_one_row_with_key_type_operation(gateway, sink, pg, unique):
    async with httpx.AsyncClient(timeout=10) as client:
        url = gateway.stream_url(unique)
        await client.put(
            url,
            headers=JSON,
            content=b'[{"type":"presence","key":"u1","operation":"insert","value":{"on":true}}]',
        )
        appended = await client.post(
            url, headers=JSON, content=b'[{"type":"chat","text":"hi"}, 42, "plain", {"key": 7}]'
        )
        assert appended.status_code == 204
        rows = await wait_until(lambda: _rows_when(pg, unique, 5))
        assert [(r["event_key"], r["event_type"], r["operation"]) for r in rows] == [
            ("u1", "presence", "insert"),
            (None, "chat", None),
            (None, None, None),
            (None, None, None),
            ("7", None, None),
        ]
        assert [json.loads(r["payload"]) for r in rows][1:3] == [{"type": "chat", "text": "hi"}, 42]
        # A row's ds_offset is the message's offset: the last one is the stream's tail,
        # and reading from any row's offset returns exactly the messages after it.
        assert rows[-1]["ds_offset"] == appended.headers["stream-next-offset"]
        after = await client.get(url, params={"offset": rows[2]["ds_offset"]})
        assert after.json() == ["plain", {"key": 7}]


async def _rows_when(pg, stream, n):  # type: ignore[no-untyped-def]
    rows = await rows_of(pg, stream)
    return rows if len(rows) >= n else None


async def test_unsynced_and_non_json_streams_get_no_rows(gateway, sink, pg, unique):
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(
            gateway.stream_url(unique + "-text"), headers={"content-type": "text/plain"}, content=b"x"
        )
        await client.put(gateway.stream_url(unique), headers=JSON, content=b"[1]")
        await wait_until(lambda: _rows_when(pg, unique, 1))
        assert await rows_of(pg, unique + "-text") == []


async def test_rows_outlive_the_stream_and_refused_messages_are_kept_aside(gateway, sink, pg, unique):
    async with httpx.AsyncClient(timeout=10) as client:
        url = gateway.stream_url(unique)
        await client.put(url, headers=JSON)
        # jsonb cannot hold \u0000; the message must neither block the shard nor vanish.
        await client.post(url, headers=JSON, content=b'[{"a":"nul\\u0000"}, {"b":1}]')
        await client.delete(url)
        rows = await wait_until(lambda: _rows_when(pg, unique, 1))
        assert [json.loads(r["payload"]) for r in rows] == [{"b": 1}]
        rejected = await pg.fetch("SELECT * FROM session_events_rejected WHERE stream_name = $1", unique)
        assert len(rejected) == 1 and b"nul" in rejected[0]["raw"]


async def _append_many(client, url, n, per_post):  # type: ignore[no-untyped-def]
    for start in range(0, n, per_post):
        batch = [{"n": i} for i in range(start, min(n, start + per_post))]
        response = await client.post(url, headers=JSON, content=json.dumps(batch).encode())
        assert response.status_code == 204


async def test_sigkilled_sink_mid_batch_loses_and_doubles_nothing(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    streams = [f"{unique}-{i}" for i in range(8)]
    per_stream = 1500
    async with httpx.AsyncClient(timeout=30) as client:
        for name in streams:
            await client.put(gateway.stream_url(name), headers=JSON)
        # Two sinks share the work; one is killed while batches are in flight.
        victim = start_worker(
            "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM, DSGW_SINK_BATCH="200"
        )
        survivor = start_worker(
            "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM, DSGW_SINK_BATCH="200"
        )
        try:
            writers = [
                asyncio.create_task(_append_many(client, gateway.stream_url(n), per_stream, 25))
                for n in streams
            ]
            await wait_until(lambda: _count_at_least(pg, unique, 500), timeout_s=60, every_s=0.02)
            victim.kill()
            await asyncio.gather(*writers)
            expected = per_stream * len(streams)
            total = await wait_until(lambda: _count_at_least(pg, unique, expected), timeout_s=90)
            assert total == expected
            distinct = await pg.fetchval(
                "SELECT count(DISTINCT (stream_name, payload->>'n')) FROM session_events WHERE stream_name LIKE $1",
                unique + "%",
            )
            assert distinct == expected
        finally:
            victim.stop()
            survivor.stop()


async def _count_at_least(pg, prefix, n):  # type: ignore[no-untyped-def]
    count = await count_rows(pg, prefix)
    return count if count >= n else None


async def test_postgres_outage_means_catch_up_not_loss(gateway, redis_server, tmp_path, unique):
    from gateway.embedded import start_postgres
    from tests.conftest import reachable_tmp_dir

    # A Postgres of its own, so stopping it does not disturb other tests.
    base = reachable_tmp_dir("dsgw-outage-")
    server = start_postgres(base / "pg", durable=False)
    from workers.migrate import migrate

    conn = await asyncpg.connect(server.url)
    await migrate(conn)
    sink = start_worker("sink", redis_server.url, server.url, tmp_path, **FAST_CLAIM)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = gateway.stream_url(unique)
            await client.put(url, headers=JSON)
            await _append_many(client, url, 300, 10)
            assert await wait_until(lambda: _count_at_least(conn, unique, 300)) == 300
            await conn.close()
            server.stop()
            await _append_many(client, url, 700, 10)  # appends keep working without Postgres
            await asyncio.sleep(1.0)
            server = start_postgres(base / "pg", port=server.port, durable=False)
            conn = await asyncpg.connect(server.url)
            assert await wait_until(lambda: _count_at_least(conn, unique, 1000), timeout_s=60) == 1000
            await asyncio.sleep(0.5)
            assert await count_rows(conn, unique) == 1000
            await conn.close()
        assert sink.stop() == 0
    finally:
        sink.stop()
        server.stop()


async def test_sigterm_drains_and_acknowledged_feed_entries_are_trimmed(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    r = redis.Redis.from_url(redis_server.url)
    sink = start_worker("sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM)
    async with httpx.AsyncClient(timeout=30) as client:
        url = gateway.stream_url(unique)
        await client.put(url, headers=JSON)
        await _append_many(client, url, 400, 20)
        assert await wait_until(lambda: _count_at_least(pg, unique, 400)) == 400

    # Trimming runs every couple of seconds: the feeds shrink to what is unacknowledged.
    async def feeds_trimmed():  # type: ignore[no-untyped-def]
        return sum(r.xlen(feed_key(s)) for s in range(SHARDS)) < 50

    assert await wait_until(feeds_trimmed, timeout_s=20)
    sink.proc.send_signal(signal.SIGTERM)
    assert sink.proc.wait(15) == 0
    pending = [r.xpending(feed_key(s), "dsgw-sink")["pending"] for s in range(SHARDS)]
    assert sum(pending) == 0


# --- Postgres -> stream ---------------------------------------------------------------


@pytest.fixture
def source(redis_server, postgres_server, tmp_path) -> Iterator[WorkerProcess]:
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path)
    yield worker
    worker.stop()


async def _publish(postgres_server, table: str, stream: str) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "publish", table, "--stream", stream],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": postgres_server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


async def _stream_json(client, gateway, stream, n, timeout_s=20):  # type: ignore[no-untyped-def]
    async def read():  # type: ignore[no-untyped-def]
        response = await client.get(gateway.stream_url(stream))
        if response.status_code == 200 and len(response.json()) >= n:
            return response.json()
        return None

    return await wait_until(read, timeout_s=timeout_s)


async def test_table_changes_reach_the_stream_in_commit_order(gateway, source, pg, postgres_server, unique):
    table = "todos_" + unique.replace("-", "_")[-12:]
    stream = f"pg/{unique}"
    await pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text, done bool DEFAULT false)")
    await _publish(postgres_server, table, stream)
    await _publish(postgres_server, table, stream)  # idempotent

    other = await asyncpg.connect(postgres_server.url)
    try:
        # T1 starts first but commits last: the stream follows commit order.
        t1 = other.transaction()
        await t1.start()
        await other.execute(f"INSERT INTO {table} (id, title) VALUES (1, 'first begun')")
        async with pg.transaction():
            await pg.execute(f"INSERT INTO {table} (id, title) VALUES (2, 'first committed')")
            await pg.execute(f"INSERT INTO {table} (id, title) VALUES (3, 'same txn')")
        await t1.commit()
    finally:
        await other.close()
    await pg.execute(f"UPDATE {table} SET done = true WHERE id = 2")
    await pg.execute(f"DELETE FROM {table} WHERE id = 3")

    async with httpx.AsyncClient(timeout=10) as client:
        messages = await _stream_json(client, gateway, stream, 5)
    assert [(m["key"], m["headers"]["operation"]) for m in messages] == [
        ("2", "insert"), ("3", "insert"), ("1", "insert"), ("2", "update"), ("3", "delete"),
    ]  # fmt: skip
    assert all(m["type"] == table for m in messages)
    assert messages[0]["value"] == {"id": 2, "title": "first committed", "done": False}
    assert messages[3]["old_value"]["done"] is False and messages[3]["value"]["done"] is True
    assert "value" not in messages[4] and messages[4]["old_value"]["id"] == 3
    # One transaction, one append: both rows of the second transaction share a txid.
    assert messages[0]["headers"]["txid"] == messages[1]["headers"]["txid"] != messages[2]["headers"]["txid"]
    assert all(m["headers"]["timestamp"].endswith("Z") for m in messages)


async def test_source_killed_and_restarted_neither_loses_nor_repeats(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    table = "events_" + unique.replace("-", "_")[-12:]
    stream = f"pg/{unique}"
    await pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    await _publish(postgres_server, table, stream)
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path, DSGW_SOURCE_BATCH="7")
    total = 600
    try:

        async def write():  # type: ignore[no-untyped-def]
            for i in range(total):
                await pg.execute(f"INSERT INTO {table} (id, v) VALUES ($1, $1)", i)

        writer = asyncio.create_task(write())
        async with httpx.AsyncClient(timeout=10) as client:
            await _stream_json(client, gateway, stream, 50)
            worker.kill()
            worker = start_worker(
                "source", redis_server.url, postgres_server.url, tmp_path, DSGW_SOURCE_BATCH="7"
            )
            await writer
            messages = await _stream_json(client, gateway, stream, total, timeout_s=60)
            await asyncio.sleep(1.0)
            messages = (await client.get(gateway.stream_url(stream))).json()
        assert [m["value"]["v"] for m in messages] == list(range(total))
        assert await pg.fetchval("SELECT count(*) FROM dsgw_outbox WHERE stream = $1", stream) == 0
    finally:
        worker.stop()


async def test_round_trip_insert_reaches_stream_and_session_events(
    gateway, sink, source, pg, postgres_server, unique
):
    table = "msgs_" + unique.replace("-", "_")[-12:]
    stream = f"pg/{unique}"
    await pg.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, body text)")
    await _publish(postgres_server, table, stream)
    await pg.execute(f"INSERT INTO {table} VALUES ('m1', 'hello')")
    rows = await wait_until(lambda: _rows_when(pg, stream, 1))
    assert rows[0]["event_type"] == table and rows[0]["event_key"] == "m1"
    assert json.loads(rows[0]["payload"])["value"] == {"id": "m1", "body": "hello"}


async def test_messages_postgres_refuses_never_stall_a_shard_and_numbers_stay_exact(
    gateway, sink, pg, unique
):
    import secrets

    long_key = secrets.token_hex(2000)  # 4000 random chars: too big for a btree index entry
    body = (
        '[{"n":1, "price": 12345678901234567.891}, {"s":"\\ud800"}, {"key":"' + long_key + '"}, {"n":2}]'
    ).encode()
    async with httpx.AsyncClient(timeout=10) as client:
        url = gateway.stream_url(unique)
        await client.put(url, headers=JSON)
        assert (await client.post(url, headers=JSON, content=body)).status_code == 204
    rows = await wait_until(lambda: _rows_when(pg, unique, 2))
    assert [r["payload"] for r in rows] == ['{"n": 1, "price": 12345678901234567.891}', '{"n": 2}']
    rejected = await pg.fetch("SELECT raw FROM session_events_rejected WHERE stream_name = $1", unique)
    assert sorted(len(r["raw"]) > 1000 for r in rejected) == [False, True]


async def test_transactions_are_whole_appends_keys_can_change_and_numbers_stay_exact(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    from gateway.keys import stream_keys

    r = redis.Redis.from_url(redis_server.url)
    suffix = unique.replace("-", "_")[-10:]
    items, notes = f"items_{suffix}", f"notes_{suffix}"
    s_items, s_notes = f"pg/{unique}/items", f"pg/{unique}/notes"
    await pg.execute(f"CREATE TABLE {items} (id int PRIMARY KEY, price numeric)")
    await pg.execute(f"CREATE TABLE {notes} (id int PRIMARY KEY, body text)")
    await _publish(postgres_server, items, s_items)
    await _publish(postgres_server, notes, s_notes)
    # A small batch: the 12-row transaction below must still be one append.
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path, DSGW_SOURCE_BATCH="5")
    try:
        async with pg.transaction():  # items, notes, items again: one append per stream
            await pg.execute(f"INSERT INTO {items} VALUES (1, 12345678901234567.891)")
            await pg.execute(f"INSERT INTO {notes} VALUES (1, 'n')")
            for i in range(2, 12):
                await pg.execute(f"INSERT INTO {items} VALUES ($1, $2)", i, i)
        await pg.execute(f"UPDATE {items} SET id = 100 WHERE id = 1")  # a key change
        async with httpx.AsyncClient(timeout=10) as client:
            items_messages = await _stream_json(client, gateway, s_items, 13)
            notes_messages = await _stream_json(client, gateway, s_notes, 1)
            # Deleted meanwhile: the next change re-creates the stream, nothing is dropped.
            await client.delete(gateway.stream_url(s_notes))
            await pg.execute(f"INSERT INTO {notes} VALUES (2, 'after delete')")
            after = await _stream_json(client, gateway, s_notes, 1)
    finally:
        worker.stop()
    raw = r.xrange(stream_keys(s_items).data)
    assert raw[0][1][b"json"].startswith(
        f'{{"type":"{items}","key":"1","value":{{"id": 1, "price": 12345678901234567.891}}'.encode()
    )
    assert raw[0][1][b"more"] == b"10"  # the transaction's 11 item rows: one append
    assert [(m["key"], m["headers"]["operation"]) for m in items_messages[11:]] == [
        ("1", "delete"),
        ("100", "insert"),
    ]
    assert [m["key"] for m in notes_messages] == ["1"]
    assert [m["value"]["body"] for m in after] == ["after delete"]
