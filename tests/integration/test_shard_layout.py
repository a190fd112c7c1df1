"""A process whose DSGW_SHARDS is not the layout the Redis was written with
refuses to start, with one line saying what to do."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import redis

from gateway.embedded import start_redis
from gateway.keys import LAYOUT_KEY
from tests.conftest import ROOT, start_gateway


@pytest.fixture
def own_redis(tmp_path):
    server = start_redis(tmp_path / "redis", persistent=False)
    yield server
    server.stop()


def test_a_fresh_redis_gets_the_layout_of_the_first_gateway(own_redis, tmp_path):
    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="64")
    try:
        assert httpx.put(gw.stream_url("a"), headers={"content-type": "text/plain"}).status_code == 201
    finally:
        gw.stop()
    assert redis.Redis.from_url(own_redis.url).get(LAYOUT_KEY) == b"balanced-64"


def test_the_gateway_and_the_sink_refuse_another_layout(own_redis, postgres_server, tmp_path):
    r = redis.Redis.from_url(own_redis.url)
    r.set(LAYOUT_KEY, "balanced-64")
    with pytest.raises(Exception, match="exited with 3"):  # uvicorn: startup failed
        start_gateway(own_redis.url, tmp_path)  # DSGW_SHARDS unset: 1024
    log = "".join(p.read_text() for p in tmp_path.glob("gateway-*.log"))
    assert "refusing to start: Redis holds streams in shard layout balanced-64 but DSGW_SHARDS=1024" in log
    for worker in ("sink", "source"):
        refused = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "worker", worker],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "REDIS_URL": own_redis.url, "DATABASE_URL": postgres_server.url},
        )  # fmt: skip
        assert refused.returncode == 1, worker
        assert refused.stderr.strip().splitlines()[-1] == (
            "dsgw: refusing to start: Redis holds streams in shard layout balanced-64 but DSGW_SHARDS=1024"
            " means balanced-1024: set DSGW_SHARDS=64, or stop every process and run `dsgw reshard --to 1024`"
        )
    assert r.get(LAYOUT_KEY) == b"balanced-64"  # nothing re-keyed, nothing recorded
