"""Postgres sync benchmark: sink throughput and lag, source lag.

    python -m e2e.bench_sync [--rows 100000] [--seconds 10] [--rate 1000]

Starts its own Redis, Postgres, gateway and workers (nothing else must run),
then measures, printing every number next to a baseline from the same run:

1. sink throughput: one `dsgw worker sink` draining a feed pre-filled with
   --rows messages, against the baseline of COPY + INSERT ... ON CONFLICT of
   the same rows on one Postgres connection (the best a sink can do).
2. sink lag at --rate messages/s for --seconds: appended through the gateway
   (acknowledged time) until the row is visible in session_events (polled
   every 5 ms, so lags are overstated by up to 5 ms).
3. source lag: INSERT committed in Postgres until an SSE reader of the
   published stream receives the change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.embedded import start_postgres, start_redis  # noqa: E402
from gateway.protocol import JSON_MEDIA_TYPE  # noqa: E402
from gateway.redis_mux import connect_mux  # noqa: E402
from gateway.store import Store  # noqa: E402
from tests.conftest import reachable_tmp_dir, start_gateway, start_worker  # noqa: E402
from workers.migrate import migrate  # noqa: E402
from workers.sink import INSERT_FROM_STAGE, STAGE_DDL, rows_from_feed_entry  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def prefill(redis_url: str, streams: int, rows: int) -> None:
    mux = await connect_mux(redis_url, cluster=False, timeout_s=30, client_name="dsgw-bench")
    store = Store(mux)
    per_append = 100
    for s in range(streams):
        await store.create_json_stream(f"bench/s{s}")
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            messages = [
                json.dumps(
                    {"type": "chat", "key": f"u{j % 50}", "n": i * per_append + j, "text": "hello world"}
                )
                for j in range(per_append)
            ]
            await store.append(f"bench/s{i % streams}", JSON_MEDIA_TYPE, messages)

    await asyncio.gather(*(one(i) for i in range(rows // per_append)))
    await mux.close()


async def baseline_copy_rate(pg_url: str, redis_url: str, sample: int) -> float:
    """COPY + INSERT ON CONFLICT of the feed's own rows on one connection."""
    from gateway.keys import SHARDS, feed_key

    redis = aioredis.Redis.from_url(redis_url)
    rows = []
    for shard in range(SHARDS):
        for _, fields in await redis.xrange(feed_key(shard), count=sample):
            rows.extend(rows_from_feed_entry(fields))
    await redis.aclose()
    rows = [(("baseline/" + r[0]),) + r[1:] for r in rows][:sample]
    conn = await asyncpg.connect(pg_url)
    started = time.perf_counter()
    for start in range(0, len(rows), 2000):
        async with conn.transaction():
            await conn.execute(STAGE_DDL)
            await conn.copy_records_to_table("dsgw_sink_stage", records=rows[start : start + 2000])
            await conn.execute(INSERT_FROM_STAGE)
    elapsed = time.perf_counter() - started
    await conn.execute("DELETE FROM session_events WHERE stream_name LIKE 'baseline/%'")
    await conn.close()
    return len(rows) / elapsed


async def count(pg: asyncpg.Connection, prefix: str) -> int:
    return await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name LIKE $1", prefix + "%")


async def sink_throughput(args, redis_url, pg_url, tmp) -> None:  # type: ignore[no-untyped-def]
    await prefill(redis_url, 8, args.rows)
    baseline = await baseline_copy_rate(pg_url, redis_url, min(args.rows, 50_000))
    pg = await asyncpg.connect(pg_url)
    sink = start_worker("sink", redis_url, pg_url, tmp, DSGW_SINK_BATCH="2000")
    # Time from the first row on, so the worker's start-up is not counted.
    while (first := await count(pg, "bench/")) == 0:
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    while await count(pg, "bench/") < args.rows:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    sink.stop()
    await pg.close()
    rate = (args.rows - first) / elapsed
    print(f"sink throughput, 1 worker: {rate:,.0f} rows/s ({args.rows - first} rows in {elapsed:.2f} s)")
    print(f"baseline COPY + ON CONFLICT, 1 connection: {baseline:,.0f} rows/s")
    print(f"ratio sink / baseline: {rate / baseline:.2f}")


async def sink_lag(args, gateway, redis_url, pg_url, tmp) -> None:  # type: ignore[no-untyped-def]
    sink = start_worker("sink", redis_url, pg_url, tmp)
    pg = await asyncpg.connect(pg_url)
    acked: dict[int, float] = {}
    seen: dict[int, float] = {}
    total = args.rate * args.seconds
    async with httpx.AsyncClient(timeout=10) as client:
        url = gateway.stream_url("lag/s")
        await client.put(url, headers={"content-type": "application/json"})
        await asyncio.sleep(1.0)  # the sink is up

        async def produce() -> None:
            start = time.perf_counter()
            for i in range(total):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = json.dumps([{"n": i}]).encode()
                await client.post(url, headers={"content-type": "application/json"}, content=body)
                acked[i] = time.perf_counter()

        async def observe() -> None:
            last = ""
            while len(seen) < total:
                rows = await pg.fetch(
                    "SELECT (payload->>'n')::int AS n, ds_offset FROM session_events"
                    " WHERE stream_name = 'lag/s' AND ds_offset > $1 ORDER BY ds_offset",
                    last,
                )
                now = time.perf_counter()
                for row in rows:
                    seen.setdefault(row["n"], now)
                    last = row["ds_offset"]
                await asyncio.sleep(0.005)

        await asyncio.wait_for(asyncio.gather(produce(), observe()), args.seconds * 3 + 30)
    sink.stop()
    await pg.close()
    lags = [(seen[i] - acked[i]) * 1000 for i in range(total)]
    print(
        f"sink lag at {args.rate} msg/s over {args.seconds} s: p50 {pct(lags, 50):.1f} ms,"
        f" p99 {pct(lags, 99):.1f} ms, max {max(lags):.1f} ms (ack -> row visible; 5 ms polling)"
    )


async def source_lag(args, gateway, redis_url, pg_url, tmp) -> None:  # type: ignore[no-untyped-def]
    pg = await asyncpg.connect(pg_url)
    await pg.execute("CREATE TABLE IF NOT EXISTS bench_items (id int PRIMARY KEY, v text)")
    from workers.source import publish

    await publish(pg, "bench_items", "pg/bench_items")
    source = start_worker("source", redis_url, pg_url, tmp)
    committed: dict[int, float] = {}
    received: dict[int, float] = {}
    n = min(2000, args.rate * args.seconds)
    async with httpx.AsyncClient(timeout=30) as client:
        await client.put(gateway.stream_url("pg/bench_items"), headers={"content-type": "application/json"})

        async def read() -> None:
            offset = "now"
            while len(received) < n:
                async with client.stream(
                    "GET", gateway.stream_url("pg/bench_items"), params={"offset": offset, "live": "sse"}
                ) as sse:
                    event = None
                    async for line in sse.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "data":
                            now = time.perf_counter()
                            for m in json.loads(line[5:]):
                                received.setdefault(m["value"]["id"], now)
                        elif line.startswith("data:") and event == "control":
                            offset = json.loads(line[5:])["streamNextOffset"]
                        if len(received) >= n:
                            return

        reader = asyncio.create_task(read())
        await asyncio.sleep(1.0)
        for i in range(n):
            await pg.execute("INSERT INTO bench_items VALUES ($1, 'x')", i)
            committed[i] = time.perf_counter()
            await asyncio.sleep(1 / args.rate)
        await asyncio.wait_for(reader, 60)
    source.stop()
    await pg.close()
    lags = [(received[i] - committed[i]) * 1000 for i in range(n)]
    print(
        f"source lag over {n} single-row commits: p50 {pct(lags, 50):.1f} ms, p99 {pct(lags, 99):.1f} ms (commit -> SSE)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = reachable_tmp_dir("dsgw-bench-pg-")
        redis = start_redis(tmp / "redis", persistent=False)
        pg = start_postgres(base / "pg", durable=False)
        gateway = start_gateway(redis.url, tmp, DSGW_SINK_STREAMS="bench/*,lag/*,pg/*")
        try:
            conn = await asyncpg.connect(pg.url)
            await migrate(conn)
            await conn.close()
            await sink_throughput(args, redis.url, pg.url, tmp)
            await sink_lag(args, gateway, redis.url, pg.url, tmp)
            await source_lag(args, gateway, redis.url, pg.url, tmp)
        finally:
            gateway.stop()
            pg.stop()
            redis.stop()
            import shutil

            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
