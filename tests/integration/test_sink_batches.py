# ruff: noqa: F811  (the tests take the `pg` fixture of test_postgres_sync as a parameter)
"""The sink under pressure: big messages with bounded memory, a poison message
among them, one shard that cannot write while the others can, and the
operation of changes the source worker published. Real Postgres, Redis,
gateway and worker processes."""

from __future__ import annotations

import contextlib
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


async def _metric(port: int, name: str) -> float:
    """One unlabelled sample of a worker's /metrics."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _on_other_shards(base: str, count: int) -> list[str]:
    """`count` stream names on as many different shards."""
    names: list[str] = []
    n = 0
    while len(names) < count:
        name = f"{base}-{n}"
        n += 1
        if shard_of(name) not in {shard_of(other) for other in names}:
            names.append(name)
    return names


def _bounded_sink(redis_server, postgres_server, tmp_path, batch_bytes: int, inflight_bytes: int):  # type: ignore[no-untyped-def]
    """A sink with these byte bounds, and the port of its /metrics."""
    port = free_port()
    sink = start_worker(
        "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM,
        DSGW_SINK_BATCH_BYTES=str(batch_bytes), DSGW_SINK_INFLIGHT_BYTES=str(inflight_bytes),
        DSGW_WORKER_METRICS_PORT=str(port),
    )  # fmt: skip
    return sink, port


async def test_big_messages_are_written_with_bounded_memory_past_a_poison_message(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    # 200 messages of 1 MiB over 5 streams on 5 shards: 5 batches could be
    # read at once (4 writers, read-ahead), but the bytes in flight are
    # bounded by DSGW_SINK_INFLIGHT_BYTES for the whole process.
    count, batch_bytes, inflight_bytes = 200, 8 * MIB, 16 * MIB
    streams = _on_other_shards(unique, 5)
    main, others = streams[0], streams[1:]
    async with httpx.AsyncClient(timeout=30) as client:
        for name in streams:
            await client.put(gateway.stream_url(name), headers=JSON)
        for i in range(count):
            blob = "x" * MIB
            body = json.dumps([{"n": i, "blob": blob}])
            if i == 50:  # jsonb cannot hold \u0000: this append must not block the ones behind it
                body = json.dumps([{"n": i, "bad": "nul\u0000"}, {"n": "after-bad"}])
            name = main if i < 100 else others[i % 4]
            response = await client.post(gateway.stream_url(name), headers=JSON, content=body.encode())
            assert response.status_code == 204
    # Started after the appends, the sink finds 200+ MiB waiting in its feeds.
    sink, port = _bounded_sink(redis_server, postgres_server, tmp_path, batch_bytes, inflight_bytes)
    try:

        async def written() -> int | None:
            total = 0
            for name in streams:
                total += await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name = $1", name)
            return total if total >= count else None

        assert await wait_until(written, timeout_s=180) == count
        peak = peak_rss_bytes(sink.proc.pid)
        peak_inflight = await _metric(port, "dsgw_sink_inflight_peak_bytes")
        print(f"sink peak RSS {peak / MIB:.1f} MiB, peak in flight {peak_inflight / MIB:.1f} MiB")
    finally:
        sink.stop()
    numbers = await pg.fetch(
        "SELECT payload->>'n' AS n, length(payload->>'blob') AS size FROM session_events"
        " WHERE stream_name = $1 ORDER BY ds_offset",
        main,
    )
    expected = [str(i) for i in range(50)] + ["after-bad"] + [str(i) for i in range(51, 100)]
    assert [r["n"] for r in numbers] == expected
    assert all(r["size"] == MIB for r in numbers if r["n"] != "after-bad")
    for name in others:
        n = await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name = $1", name)
        assert n == 25
    rejected = await pg.fetch("SELECT raw FROM session_events_rejected WHERE stream_name = $1", main)
    assert len(rejected) == 1 and b"nul" in rejected[0]["raw"]
    # The bound itself, counted by the sink: never more feed bytes read and
    # not yet written than DSGW_SINK_INFLIGHT_BYTES (no entry is bigger).
    assert 2 * MIB < peak_inflight <= inflight_bytes
    # And what it costs, far below the 200 MiB backlog: the idle sink is ~50
    # MiB; the bytes in flight are held about twice (Redis reply, then COPY
    # buffers) plus allocator slack, which varies with what else the feeds
    # hold (run alone: 94-97 MiB; in the full suite, whose earlier tests leave
    # backlog in the shared Redis: 112 MiB).
    assert peak < 60 * MIB + 4 * inflight_bytes, f"sink peak RSS {peak / MIB:.0f} MiB"


async def test_an_entry_bigger_than_the_inflight_budget_is_read_alone(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    budget = 32 * 1024
    streams = _on_other_shards(unique, 3)
    async with httpx.AsyncClient(timeout=30) as client:
        for name in streams:
            await client.put(gateway.stream_url(name), headers=JSON)
        for name in streams[1:]:  # small entries on other shards, read alongside
            for i in range(20):
                body = json.dumps([{"n": i, "pad": "y" * 1000}]).encode()
                assert (
                    await client.post(gateway.stream_url(name), headers=JSON, content=body)
                ).status_code == 204
        big = json.dumps([{"n": "big", "blob": "x" * (200 * 1024)}]).encode()
        for body in (b'[{"n": "before"}]', big, b'[{"n": "after"}]'):
            assert (
                await client.post(gateway.stream_url(streams[0]), headers=JSON, content=body)
            ).status_code == 204
    sink, port = _bounded_sink(redis_server, postgres_server, tmp_path, budget, budget)
    try:
        rows = await wait_until(lambda: _rows_when(pg, streams[0], 3), timeout_s=60)
        for name in streams[1:]:
            assert await wait_until(lambda name=name: _rows_when(pg, name, 20), timeout_s=60)
        peak_inflight = await _metric(port, "dsgw_sink_inflight_peak_bytes")
    finally:
        sink.stop()
    assert [json.loads(r["payload"])["n"] for r in rows] == ["before", "big", "after"]
    # The big entry went alone: the peak is that entry, not the entry plus others.
    assert 200 * 1024 < peak_inflight < 200 * 1024 + 1024


def _two_shards(unique: str) -> tuple[str, str]:
    stuck, fine = f"{unique}-stuck", f"{unique}-fine"
    n = 0
    while shard_of(fine) == shard_of(stuck):
        n += 1
        fine = f"{unique}-fine{n}"
    return stuck, fine


@contextlib.asynccontextmanager
async def refusing(pg, stream: str, unique: str):  # type: ignore[no-untyped-def]
    """A real failure that is not about the data (so retried, not rejected):
    a trigger that refuses this one stream's rows, until the block ends."""
    function = "refuse_" + unique.replace("-", "_")[-12:]
    await pg.execute(
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF NEW.stream_name = '{stream}' THEN RAISE EXCEPTION 'refused by {function}'; END IF;"
        " RETURN NEW; END $$"
    )
    await pg.execute(
        f"CREATE TRIGGER {function} BEFORE INSERT ON session_events FOR EACH ROW EXECUTE FUNCTION {function}()"
    )
    try:
        yield function
    finally:
        await pg.execute(f"DROP TRIGGER IF EXISTS {function} ON session_events")
        await pg.execute(f"DROP FUNCTION IF EXISTS {function}()")


async def test_one_stuck_shard_makes_the_sink_unhealthy_and_names_it(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    stuck, fine = _two_shards(unique)
    port = free_port()
    async with refusing(pg, stuck, unique) as function:
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
            # Prometheus gets the count, not a series per shard (bounded cardinality).
            assert await _metric(port, "dsgw_sink_stalled_shards") == 1
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            sink_lines = [line for line in text.splitlines() if line.startswith("dsgw_sink_")]
            assert sink_lines and not [line for line in sink_lines if "shard=" in line]
            assert await _metric(port, "dsgw_sink_lag_seconds_count") >= 1  # the fine stream's row
            await pg.execute(f"DROP TRIGGER {function} ON session_events")
            assert await wait_until(lambda: _rows_when(pg, stuck, 1), timeout_s=20)

            async def healthy():  # type: ignore[no-untyped-def]
                return (await _health(port))[0] == 200

            assert await wait_until(healthy, timeout_s=20)
        finally:
            sink.stop()


async def test_a_refused_batch_merged_with_others_holds_back_only_its_own_shard(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    """One writer, and both streams appended before the sink starts: its first
    round reads both shards, and the writer merges their batches into one
    transaction, which Postgres refuses. Written one by one, the fine shard's
    batch goes through; the refused one is retried until the trigger goes."""
    stuck, fine = _two_shards(unique)
    async with refusing(pg, stuck, unique) as function:
        async with httpx.AsyncClient(timeout=10) as client:
            for name in (stuck, fine):
                await client.put(gateway.stream_url(name), headers=JSON, content=b'[{"n":1}]')
        sink = start_worker(
            "sink", redis_server.url, postgres_server.url, tmp_path, **FAST_CLAIM, DSGW_SINK_WRITERS="1"
        )
        try:
            assert await wait_until(lambda: _rows_when(pg, fine, 1))
            assert "writing them one by one" in sink.log_path.read_text()
            assert await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name = $1", stuck) == 0
            await pg.execute(f"DROP TRIGGER {function} ON session_events")
            assert await wait_until(lambda: _rows_when(pg, stuck, 1), timeout_s=20)
        finally:
            sink.stop()


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
