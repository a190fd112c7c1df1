# ruff: noqa: F811  (the tests take the `pg` fixture of test_postgres_sync as a parameter)
"""The source worker's exactly-once under pressure: transactions bigger than
an append, a worker SIGKILLed in the middle of one, a client that sends a
huge Stream-Seq, and commit numbers that go backwards. Real Postgres, Redis,
gateway and worker processes."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from gateway.embedded import free_port
from gateway.keys import stream_keys
from tests.conftest import WorkerProcess, start_worker, wait_until
from tests.integration.test_postgres_sync import JSON, _publish, pg  # noqa: F401  (pg: a fixture)

SEQUENCE = "dsgw_outbox_commit_seq_seq"


def appends_of(redis_url: str, stream: str) -> list[list[dict[str, Any]]]:
    """The stream's messages straight from Redis, grouped by append (every
    message of an append but the last carries `more`)."""
    r = redis.Redis.from_url(redis_url)
    appends: list[list[dict[str, Any]]] = [[]]
    for _, fields in r.xrange(stream_keys(stream).data):
        appends[-1].append(json.loads(fields[b"json"]))
        if b"more" not in fields:
            appends.append([])
    return appends[:-1]


def messages_of(redis_url: str, stream: str) -> list[dict[str, Any]]:
    return [m for append in appends_of(redis_url, stream) for m in append]


async def wait_for_messages(
    redis_url: str, stream: str, n: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    async def enough():  # type: ignore[no-untyped-def]
        messages = messages_of(redis_url, stream)
        return messages if len(messages) >= n else None

    return await wait_until(enough, timeout_s=timeout_s) or messages_of(redis_url, stream)


@pytest.fixture
async def published(pg: asyncpg.Connection, postgres_server, unique: str) -> tuple[str, str]:
    """A new published table and its stream."""
    table = "src_" + unique.replace("-", "_")[-12:]
    stream = f"pg/{unique}"
    await pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    await _publish(postgres_server, table, stream)
    return table, stream


async def test_a_big_transaction_arrives_once_in_order_in_bounded_appends(
    gateway, redis_server, postgres_server, pg, published, tmp_path
):
    table, stream = published
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path)
    try:
        total = 20_000
        await pg.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, {total}) g")
        messages = await wait_for_messages(redis_server.url, stream, total)
        appends = appends_of(redis_server.url, stream)
    finally:
        worker.stop()
    assert [m["value"]["v"] for m in messages] == list(range(1, total + 1))
    assert len({m["headers"]["txid"] for m in messages}) == 1
    # Default bounds: 1000 changes and 1 MiB per append.
    assert len(appends) >= total // 1000
    assert all(len(a) <= 1000 for a in appends)
    assert all(sum(len(json.dumps(m)) for m in a[:-1]) <= 1024 * 1024 for a in appends)
    assert await pg.fetchval("SELECT count(*) FROM dsgw_outbox WHERE stream = $1", stream) == 0


async def test_a_source_sigkilled_inside_a_big_transaction_yields_every_change_once(
    gateway, redis_server, postgres_server, pg, published, tmp_path
):
    table, stream = published
    env = {"DSGW_SOURCE_MAX_APPEND_MESSAGES": "100", "DSGW_SOURCE_BATCH": "50"}
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path, **env)
    try:
        total = 20_000
        await pg.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, {total}) g")
        r = redis.Redis.from_url(redis_server.url)

        async def started():  # type: ignore[no-untyped-def]
            return r.xlen(stream_keys(stream).data) > 0

        await wait_until(started, every_s=0.005)
        worker.kill()  # in the middle of the transaction's appends (or just after them)
        worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path, **env)
        await wait_for_messages(redis_server.url, stream, total)

        async def outbox_empty():  # type: ignore[no-untyped-def]
            return await pg.fetchval("SELECT count(*) FROM dsgw_outbox WHERE stream = $1", stream) == 0

        assert await wait_until(outbox_empty)
        messages = messages_of(redis_server.url, stream)
    finally:
        worker.stop()
    assert [m["value"]["v"] for m in messages] == list(range(1, total + 1))
    assert all(len(a) <= 100 for a in appends_of(redis_server.url, stream))


async def test_a_client_stream_seq_cannot_make_the_worker_drop_changes(
    gateway, redis_server, postgres_server, pg, published, tmp_path
):
    table, stream = published
    worker = start_worker("source", redis_server.url, postgres_server.url, tmp_path)
    try:
        await pg.execute(f"INSERT INTO {table} VALUES (1, 1)")
        await wait_for_messages(redis_server.url, stream, 1)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                gateway.stream_url(stream),
                headers={**JSON, "Stream-Seq": "9" * 20},
                content=b'[{"from":"a client"}]',
            )
        assert response.status_code == 204
        for i in (2, 3, 4):
            await pg.execute(f"INSERT INTO {table} VALUES ($1, $1)", i)
        messages = await wait_for_messages(redis_server.url, stream, 5, timeout_s=20)
    finally:
        worker.stop()
    assert [m.get("value", m) for m in messages] == [
        {"id": 1, "v": 1}, {"from": "a client"}, {"id": 2, "v": 2}, {"id": 3, "v": 3}, {"id": 4, "v": 4},
    ]  # fmt: skip


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    """A worker's /healthz: status and body ((0, {}) while it is not listening yet)."""
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}/healthz")
        except httpx.TransportError:
            return 0, {}
        return response.status_code, response.json()


async def _conflicts_metric(port: int) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("dsgw_source_sequence_conflicts_total ")]
    return float(lines[0].split()[1]) if lines else 0.0


@pytest.mark.parametrize("way_back", ["sequence reset", "backup restored"])
async def test_commit_numbers_that_go_backwards_hold_the_stream_loudly_until_resync(
    gateway, redis_server, postgres_server, pg, published, tmp_path, way_back
):
    table, stream = published
    port = free_port()

    def source() -> WorkerProcess:
        return start_worker(
            "source", redis_server.url, postgres_server.url, tmp_path, DSGW_WORKER_METRICS_PORT=str(port)
        )

    before = await pg.fetchval(f"SELECT last_value FROM {SEQUENCE}")
    worker = source()
    try:
        for i in (1, 2, 3):
            await pg.execute(f"INSERT INTO {table} VALUES ($1, $1)", i)
        await wait_for_messages(redis_server.url, stream, 3)
        worker.stop()
        if way_back == "sequence reset":
            await pg.execute(f"ALTER SEQUENCE {SEQUENCE} RESTART WITH 1")
        else:  # the database as it was before those three changes
            await pg.execute("DELETE FROM dsgw_source_progress WHERE stream = $1", stream)
            await pg.execute(f"SELECT setval('{SEQUENCE}', $1)", before)
        worker = source()
        await pg.execute(f"INSERT INTO {table} VALUES (4, 4)")

        async def reported():  # type: ignore[no-untyped-def]
            status, body = await _health(port)
            return body if status == 503 and stream in body.get("sequence_conflicts", {}) else None

        body = await wait_until(reported, timeout_s=20)
        assert body, "the health endpoint never reported the conflict"
        # Reused numbers show as rows at or below those published, or (the
        # progress rows restored too) as a stream ahead of this database.
        reason = "published before" if way_back == "sequence reset" else "the stream's source sequence"
        assert reason in body["sequence_conflicts"][stream]["reason"]
        await pg.execute(f"INSERT INTO {table} VALUES (5, 5)")  # more rounds: still held, logged once
        await wait_until(lambda: _outbox_count(pg, stream, 2))
        assert await _conflicts_metric(port) == 1.0
        assert [m["value"]["v"] for m in messages_of(redis_server.url, stream)] == [1, 2, 3]
        logged = [
            json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")
        ]
        assert len([e for e in logged if e["level"] == "error" and stream in json.dumps(e)]) == 1

        # The documented recovery: stop the worker, renumber past the reported number, start.
        assert worker.stop() == 0
        await pg.execute("SELECT dsgw_source_resync($1)", body["sequence_conflicts"][stream]["resync_past"])
        worker = source()
        messages = await wait_for_messages(redis_server.url, stream, 5)
        assert await wait_until(lambda: _outbox_count(pg, stream, 0))

        async def healthy():  # type: ignore[no-untyped-def]
            return (await _health(port))[0] == 200

        assert await wait_until(healthy)
    finally:
        worker.stop()
        # Never leave the shared sequence behind numbers other tests' streams used.
        await pg.execute(
            f"SELECT setval('{SEQUENCE}', greatest($1, (SELECT last_value FROM {SEQUENCE})))", before + 100
        )
        await pg.execute("DELETE FROM dsgw_outbox WHERE stream = $1", stream)
    assert [m["value"]["v"] for m in messages] == [1, 2, 3, 4, 5]


async def _outbox_count(pg: asyncpg.Connection, stream: str, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM dsgw_outbox WHERE stream = $1", stream) == n
