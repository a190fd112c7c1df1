"""Streams spread evenly over the masters of a real Redis 7 cluster (issue 11,
item 5): with the default DSGW_SHARDS (1024 tags, each in the middle of its
own 1/1024 of the slots), the keys of a few thousand streams created through
the gateway land within 10% of the mean on every master, on 3 masters (the
session's stack, through nginx) and on 6 (a cluster of this test's own). The
legacy 16 tags split 8/4/4 on 3 masters, so one master held half the streams."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis

from e2e import stack as stack_module

STREAMS = 6000


async def create_streams(base_url: str, prefix: str, count: int) -> None:
    limit = asyncio.Semaphore(64)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def create(i: int) -> None:
            async with limit:
                r = await client.put(
                    f"/v1/stream/{prefix}/{i}", headers={"content-type": "text/plain"}, content=b"x"
                )
                assert r.status_code == 201, r.text

        await asyncio.gather(*(create(i) for i in range(count)))


def keys_per_master(redis_url: str, prefix: str) -> dict[str, int]:
    """Keys of the streams under `prefix`, counted on each master by SCAN."""
    nodes: dict[str, Any] = redis.Redis.from_url(redis_url).cluster("nodes")
    counts = {}
    for address, node in nodes.items():
        if "master" not in str(node.get("flags", "")):
            continue
        host, port = address.split("@")[0].rsplit(":", 1)
        r = redis.Redis(host=host, port=int(port))
        counts[address] = sum(1 for _ in r.scan_iter(match=f"ds:{{*}}:{prefix}/*", count=1000))
    return counts


async def shard_stats(redis_url: str) -> dict[int, tuple[int, int]]:
    from gateway.redis_client import connect
    from gateway.shard_stats import collect

    target = await connect(redis_url, max_connections=4)
    try:
        return await collect(target)
    finally:
        await target.close()


def assert_balanced(counts: dict[str, int], masters: int) -> None:
    print(f"keys per master on {masters} masters: {sorted(counts.values())}")
    assert len(counts) == masters
    mean = sum(counts.values()) / masters
    assert mean >= 2 * STREAMS / masters * 0.99  # meta and data of every stream were counted
    for address, n in counts.items():
        assert abs(n - mean) <= 0.10 * mean, f"{address} holds {n} keys, mean {mean:.0f}: {counts}"


def test_streams_spread_within_10_percent_over_3_masters(stack):  # type: ignore[no-untyped-def]
    asyncio.run(create_streams(stack.base_url, "balance3", STREAMS))
    assert_balanced(keys_per_master(stack.redis_url, "balance3"), 3)


def test_streams_spread_within_10_percent_over_6_masters():  # type: ignore[no-untyped-def]
    own = stack_module.Stack(redis_mode="cluster")
    try:
        own.redis_url = stack_module.start_redis_cluster(own, masters=6)
        gateway = stack_module.start_gateway_replica(own, {"DSGW_SINK_STREAMS": "-"})
        own.procs.append(gateway)
        stack_module.wait_ready(f"http://127.0.0.1:{gateway.port}/readyz")
        asyncio.run(create_streams(f"http://127.0.0.1:{gateway.port}", "balance6", STREAMS))
        assert_balanced(keys_per_master(own.redis_url, "balance6"), 6)
        stats = asyncio.run(shard_stats(own.redis_url))  # what /metrics reports per shard
        assert len(stats) == 1024 and sum(keys for keys, _ in stats.values()) >= 2 * STREAMS
        assert all(size > 0 for keys, size in stats.values() if keys)
    finally:
        for proc in reversed(own.procs):  # only what this test started, by PID
            stack_module.stop_proc(proc)
