# ruff: noqa: F811  (the tests take the `pg` fixture of test_postgres_sync as a parameter)
"""The sink with 1,024 shards: one poller and a few writers drain every feed
through a bounded number of Redis connections (not a loop, and a blocking
connection, per shard)."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis

from gateway.embedded import free_port
from gateway.keys import SHARDS, shard_of
from gateway.reshard import undrained_feeds
from tests.conftest import start_worker, wait_until
from tests.integration.test_postgres_sync import JSON, pg  # noqa: F401  (pg: a fixture)
from tests.integration.test_source_sequences import _health

STREAMS = 1500
WRITERS = 2


async def _rows(pg, prefix: str) -> int:  # type: ignore[no-untyped-def]
    return await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name LIKE $1", prefix + "%")


async def test_a_sink_drains_1024_feeds_through_a_bounded_number_of_connections(
    gateway, redis_server, postgres_server, pg, unique, tmp_path
):
    assert SHARDS == 1024
    names = [f"{unique}/{i}" for i in range(STREAMS)]
    assert len({shard_of(n) for n in names}) > 700  # most shards have a feed entry waiting
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=30) as client:

        async def write(name: str) -> None:
            async with limit:
                assert (
                    await client.put(gateway.stream_url(name), headers=JSON, content=b'[{"a":1}]')
                ).is_success
                assert (
                    await client.post(gateway.stream_url(name), headers=JSON, content=b'[{"b":2}]')
                ).is_success

        await asyncio.gather(*(write(n) for n in names))

    port = free_port()
    sink = start_worker(
        "sink", redis_server.url, postgres_server.url, tmp_path,
        DSGW_CONSUMER_NAME=unique, DSGW_SINK_WRITERS=str(WRITERS), DSGW_WORKER_METRICS_PORT=str(port),
    )  # fmt: skip
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await wait_until(lambda: _at_least(pg, unique, 2 * STREAMS), timeout_s=120)

        async def drained():  # type: ignore[no-untyped-def]
            return await undrained_feeds(r, SHARDS) == []

        assert await wait_until(drained, timeout_s=30)
        clients = [c for c in await r.client_list() if c["name"] == f"dsgw-sink-{unique}"]
        # The poller's pipeline, one per writer, spares, and the mux: never one per shard.
        assert 1 <= len(clients) <= WRITERS + 4 + 1, clients
        assert (await _health(port))[0] == 200  # no shard stalled, idle ones included

        # An idle shard is still read (its back-off is bounded by DSGW_SINK_BLOCK_MS).
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(gateway.stream_url(names[7]), headers=JSON, content=b'[{"late":1}]')
        assert await wait_until(lambda: _at_least(pg, unique, 2 * STREAMS + 1), timeout_s=30)
    finally:
        assert sink.stop() == 0
        await r.aclose()


async def _at_least(pg, prefix: str, n: int):  # type: ignore[no-untyped-def]
    count = await _rows(pg, prefix)
    return count if count >= n else None
