"""Redis memory per shard in /metrics: one process measures (the lease), every
process reports what was measured."""

from __future__ import annotations

import re

import httpx
import pytest
import redis

from gateway.embedded import start_redis
from gateway.keys import SHARD_STATS, shard_of
from tests.conftest import start_gateway, wait_until


@pytest.fixture
def own_redis(tmp_path):
    server = start_redis(tmp_path / "redis", persistent=False)
    yield server
    server.stop()


def shard_metrics(base_url: str) -> dict[str, dict[int, float]]:
    text = httpx.get(f"{base_url}/metrics").text
    found: dict[str, dict[int, float]] = {"keys": {}, "memory_bytes": {}}
    for kind, shard, value in re.findall(
        r'^dsgw_redis_shard_(keys|memory_bytes)\{shard="(\d+)"\} (\S+)$', text, re.M
    ):
        found[kind][int(shard)] = float(value)
    return found


async def test_metrics_show_each_shards_keys_and_memory(own_redis, tmp_path):
    big, small = "stats/big", "stats/small"
    assert shard_of(big) != shard_of(small)
    gws = [
        start_gateway(own_redis.url, tmp_path, DSGW_SHARD_STATS_S="1", DSGW_SINK_STREAMS="-")
        for _ in range(2)
    ]
    try:
        with httpx.Client(timeout=10) as c:
            c.put(gws[0].stream_url(small), headers={"content-type": "text/plain"}, content=b"x")
            c.put(gws[0].stream_url(big), headers={"content-type": "text/plain"})
            for _ in range(50):
                c.post(gws[0].stream_url(big), headers={"content-type": "text/plain"}, content=b"y" * 10_000)

        async def measured():  # type: ignore[no-untyped-def]
            # The stats are a sample taken every second: one taken during the
            # fill shows part of it, so wait for one taken after (500 KB in).
            seen = [shard_metrics(gw.url) for gw in gws]
            ok = all(
                m["keys"].get(shard_of(big), 0) >= 2
                and m["keys"].get(shard_of(small), 0) >= 2
                and m["memory_bytes"].get(shard_of(big), 0) > 400_000
                for m in seen
            )
            return seen if ok else None

        seen = await wait_until(measured, timeout_s=20)
        for m in seen:  # both replicas report, whichever measured
            assert m["memory_bytes"][shard_of(big)] > 400_000 > m["memory_bytes"][shard_of(small)] > 0
        assert redis.Redis.from_url(own_redis.url).hlen(SHARD_STATS) == 1024
    finally:
        for gw in gws:
            gw.stop()
