"""Scenario 7: one Postgres transaction inserts 200,000 rows into a published
table. The source worker delivers them to the table's stream exactly once, in
commit order, in bounded appends (DSGW_SOURCE_MAX_APPEND_MESSAGES), so Redis
keeps answering: a client PINGs it every 10 ms throughout and the worst
answer time is printed."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

import asyncpg
import redis
import redis.asyncio as aioredis

from e2e.chaos.tools import ROOT, client, read_all, running_stack
from gateway.keys import stream_keys

ROWS = 200_000
# Worst Redis answer time tolerated: an append script of the source carries at
# most 1,000 changes (1 MiB); on the busy 2-core dev machine one takes tens of ms.
WORST_PING_MS = 500


async def ping_every_10ms(url: str, stop: asyncio.Event, samples: list[tuple[float, float]]) -> None:
    r = aioredis.Redis.from_url(url)
    try:
        while not stop.is_set():
            sent = time.monotonic()
            await r.ping()
            samples.append((time.monotonic(), time.monotonic() - sent))
            await asyncio.sleep(0.01)
    finally:
        await r.aclose()


async def test_bulk_transaction_of_200k_rows():
    started = time.monotonic()
    with running_stack() as stack:
        table = "bulk_" + uuid.uuid4().hex[:8]
        stream = f"pg/{table}"
        pg = await asyncpg.connect(stack.database_url)
        try:
            await pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text)")
            subprocess.run(
                [sys.executable, "-m", "gateway.cli", "publish", table, "--stream", stream],
                env={**os.environ, "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url},
                cwd=ROOT, check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            stop = asyncio.Event()
            samples: list[tuple[float, float]] = []
            probe = asyncio.create_task(ping_every_10ms(stack.redis_url, stop, samples))
            await asyncio.sleep(1)
            committing = time.monotonic()
            await pg.execute(
                f"INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g"
            )  # one statement outside a transaction block: one transaction
            committed = time.monotonic()
        finally:
            await pg.close()

        data_key = stream_keys(stream).data
        r = redis.Redis.from_url(stack.redis_url)
        try:
            deadline = time.monotonic() + 300
            while r.xlen(data_key) < ROWS and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            delivered = time.monotonic()
        finally:
            r.close()
        await asyncio.sleep(1)
        stop.set()
        await probe
        async with client(timeout_s=60) as http:
            messages = await read_all(http, f"{stack.base_url}/v1/stream/{stream}")

        keys = [m["key"] for m in messages]
        expected = [str(i) for i in range(1, ROWS + 1)]
        txids = {m["headers"]["txid"] for m in messages}
        ops = {m["headers"]["operation"] for m in messages}
        during = [lat for at, lat in samples if committing <= at <= delivered]
        worst_ms = max(lat for _, lat in samples) * 1000
        print(f"  INSERT of {ROWS} rows committed in {committed - committing:.1f} s; on the stream "
              f"{delivered - committed:.1f} s after the commit")  # fmt: skip
        print(f"  stream holds {len(messages)} messages: {len(set(keys))} distinct keys, in commit order: "
              f"{keys == expected}, transactions: {len(txids)}, operations: {sorted(ops)}")  # fmt: skip
        print(f"  Redis PING every 10 ms: {len(samples)} answers, worst {worst_ms:.1f} ms; during the delivery "
              f"median {statistics.median(during) * 1000:.1f} ms, worst {max(during) * 1000:.1f} ms")  # fmt: skip
        print(f"  scenario 7 took {time.monotonic() - started:.0f} s")
        assert len(messages) == ROWS and keys == expected
        assert len(txids) == 1 and ops == {"insert"}
        assert worst_ms < WORST_PING_MS
