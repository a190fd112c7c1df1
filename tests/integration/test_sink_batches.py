# ruff: noqa: F811  (the tests take the `pg` fixture of test_postgres_sync as a parameter)
"""The sink under pressure: big messages with bounded memory, a poison message
among them, one shard that cannot write while the others can, and the
operation of changes the source worker published. Real Postgres, Redis,
gateway and worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway.embedded import free_port
from gateway.keys import shard_of
from tests.conftest import start_worker, wait_until
from tests.integration.test_postgres_sync import (  # noqa: F401  (pg: a fixture)
    FAST_CLAIM,
    JSON,
    _count_at_least,
    _rows_when,
    pg,
)
from tests.integration.test_source_sequences import _health, published  # noqa: F401  (published: a fixture)

MIB = 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_big_messages_are_written_with_bounded_memory_past_a_poison_message(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    count, batch_bytes = 200, 8 * MIB
    async with httpx.AsyncClient(timeout=30) as client:
        url = gateway.stream_url(unique)
        await client.put(url, headers=JSON)
        for i in range(count):
            blob = "x" * MIB
            body = json.dumps([{"n": i, "blob": blob}])
            if i == 50:  # jsonb cannot hold \u0000: this append must not block the ones behind it
                body = json.dumps([{"n": i, "bad": "nul\u0000"}, {"n": "after-bad"}])
            assert (await client.post(url, headers=JSON, content=body.encode())).status_code == 204
    # Started after the appends, the sink finds 200+ MiB waiting in one feed.
    sink = start_worker(
        "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM,
        DSGW_SINK_BATCH_BYTES=str(batch_bytes),
    )  # fmt: skip
    try:
        assert await wait_until(lambda: _count_at_least(pg, unique, count), timeout_s=120) == count
        peak = peak_rss_bytes(sink.proc.pid)
    finally:
        sink.stop()
    numbers = await pg.fetch(
        "SELECT payload->>'n' AS n, length(payload->>'blob') AS size FROM session_events"
        " WHERE stream_name = $1 ORDER BY ds_offset",
        unique,
    )
    expected = [str(i) for i in range(50)] + ["after-bad"] + [str(i) for i in range(51, count)]
    assert [r["n"] for r in numbers] == expected
    assert all(r["size"] == MIB for r in numbers if r["n"] != "after-bad")
    rejected = await pg.fetch("SELECT raw FROM session_events_rejected WHERE stream_name = $1", unique)
    assert len(rejected) == 1 and b"nul" in rejected[0]["raw"]
    # The idle sink is ~50 MiB; a batch is held a few times over (Redis reply,
    # COPY buffer). Measured: 63 MiB, against 452 MiB when a read took the whole feed.
    assert peak < 60 * MIB + 5 * batch_bytes, f"sink peak RSS {peak / MIB:.0f} MiB"


async def test_one_stuck_shard_makes_the_sink_unhealthy_and_names_it(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    stuck, fine = f"{unique}-stuck", f"{unique}-fine"
    n = 0
    while shard_of(fine) == shard_of(stuck):
        n += 1
        fine = f"{unique}-fine{n}"
    function = "refuse_" + unique.replace("-", "_")[-12:]
    # A real failure that is not about the data (so retried, not rejected):
    # a trigger that refuses this one stream's rows.
    await pg.execute(
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF NEW.stream_name = '{stuck}' THEN RAISE EXCEPTION 'refused by {function}'; END IF;"
        " RETURN NEW; END $$"
    )
    await pg.execute(
        f"CREATE TRIGGER {function} BEFORE INSERT ON session_events FOR EACH ROW EXECUTE FUNCTION {function}()"
    )
    port = free_port()
    sink = start_worker(
        "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM,
        DSGW_SINK_STALL_MS="1000", DSGW_WORKER_METRICS_PORT=str(port),
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for name in (stuck, fine):
                await client.put(gateway.stream_url(name), headers=JSON, content=b'[{"n":1}]')
        assert await wait_until(lambda: _rows_when(pg, fine, 1))  # the other shards go on

        async def unhealthy():  # type: ignore[no-untyped-def]
            status, body = await _health(port)
            return body if status == 503 else None

        body = await wait_until(unhealthy, timeout_s=20)
        assert body == {"status": "unhealthy", "stalled_shards": [shard_of(stuck)]}
        await pg.execute(f"DROP TRIGGER {function} ON session_events")
        assert await wait_until(lambda: _rows_when(pg, stuck, 1), timeout_s=20)

        async def healthy():  # type: ignore[no-untyped-def]
            return (await _health(port))[0] == 200

        assert await wait_until(healthy, timeout_s=20)
    finally:
        sink.stop()
        await pg.execute(f"DROP TRIGGER IF EXISTS {function} ON session_events")
        await pg.execute(f"DROP FUNCTION IF EXISTS {function}()")


async def test_operation_type_and_key_come_from_headers_too(
    gateway, redis_server, postgres_server, pg, published, unique, tmp_path
):
    table, stream = published
    sink = start_worker("sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM)
    source = start_worker("source", redis_server.url, postgres_server.url, tmp_path)
    try:
        await pg.execute(f"INSERT INTO {table} VALUES (1, 1)")
        await pg.execute(f"UPDATE {table} SET v = 2 WHERE id = 1")
        await pg.execute(f"DELETE FROM {table} WHERE id = 1")
        rows = await wait_until(lambda: _rows_when(pg, stream, 3))
        async with httpx.AsyncClient(timeout=10) as client:
            body = [
                {"headers": {"type": "t", "key": "k", "operation": "upsert"}},
                {"operation": "top", "headers": {"operation": "inner", "key": 7}},
                {"headers": "not an object"},
            ]
            await client.put(gateway.stream_url(unique), headers=JSON, content=json.dumps(body).encode())
        plain = await wait_until(lambda: _rows_when(pg, unique, 3))
    finally:
        source.stop()
        sink.stop()
    assert [(r["event_type"], r["event_key"], r["operation"]) for r in rows] == [
        (table, "1", "insert"), (table, "1", "update"), (table, "1", "delete"),
    ]  # fmt: skip
    assert [(r["event_type"], r["event_key"], r["operation"]) for r in plain] == [
        ("t", "k", "upsert"), (None, "7", "top"), (None, None, None),
    ]  # fmt: skip
