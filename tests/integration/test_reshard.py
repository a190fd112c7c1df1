"""`dsgw reshard --to N`: streams written with 16 shards read back the same
with 64 (JSON, bytes, forks, producer state, closed streams, TTLs), and the
command refuses while a process is connected or a feed is not drained."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import redis

from gateway.embedded import start_redis
from gateway.keys import LAYOUT_KEY, feed_key, stream_keys_in
from tests.conftest import ROOT, start_gateway

JSON = {"content-type": "application/json"}
BYTES = {"content-type": "application/octet-stream"}


def dsgw(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url},
    )  # fmt: skip


@pytest.fixture
def own_redis(tmp_path):
    server = start_redis(tmp_path / "redis", persistent=False)
    yield server
    server.stop()


def write_streams(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(40):  # enough names to land in most of the 16 shards
            assert c.put(f"/v1/stream/chat/{i}", headers=JSON, content=f'[{{"n":{i}}}]').status_code == 201
            c.post(f"/v1/stream/chat/{i}", headers=JSON, content=b'[{"m":"two"},{"m":"three"}]')
        c.put("/v1/stream/blob", headers={**BYTES, "stream-ttl": "3600"}, content=bytes(range(256)))
        c.post("/v1/stream/blob", headers=BYTES, content=b"\x00\xff" * 100)
        producer = {**JSON, "producer-id": "p1", "producer-epoch": "2"}
        c.put("/v1/stream/prod", headers=JSON)
        for seq in range(3):
            assert c.post(
                "/v1/stream/prod", headers={**producer, "producer-seq": str(seq)}, content=b"[1]"
            ).is_success
        c.post("/v1/stream/chat/0", headers={**JSON, "stream-closed": "true"}, content=b'"bye"')
        assert (
            c.put("/v1/stream/fork", headers={"stream-forked-from": "/v1/stream/chat/1"}).status_code == 201
        )
        c.post("/v1/stream/fork", headers=JSON, content=b'[{"in":"fork"}]')
        fork_ttl = {"stream-forked-from": "/v1/stream/chat/2", "stream-ttl": "3600"}
        assert c.put("/v1/stream/fork-ttl", headers=fork_ttl).status_code == 201


def read_back(url: str) -> dict[str, tuple]:
    names = [f"chat/{i}" for i in range(40)] + ["blob", "prod", "fork", "fork-ttl"]
    seen = {}
    with httpx.Client(base_url=url, timeout=10) as c:
        for name in names:
            r = c.get(f"/v1/stream/{name}", params={"offset": "-1"})
            h = r.headers
            seen[name] = (
                r.status_code, r.content, h.get("stream-next-offset"), h.get("etag"),
                h.get("stream-closed"), h.get("content-type"), h.get("stream-ttl") is not None,
            )  # fmt: skip
    return seen


def test_streams_written_with_16_shards_read_back_identically_with_64(own_redis, tmp_path):
    r = redis.Redis.from_url(own_redis.url)
    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="16", DSGW_SINK_STREAMS="-")
    try:
        write_streams(gw.url)
        before = read_back(gw.url)
        refused = dsgw(own_redis.url, "reshard", "--to", "64")
        assert refused.returncode == 1
        assert "stop every gateway and worker first; connected: dsgw-gateway-" in refused.stderr
    finally:
        gw.stop()
    assert r.get(LAYOUT_KEY) == b"legacy-16"
    assert r.exists(stream_keys_in("chat/3", 16).meta)

    moved = dsgw(own_redis.url, "reshard", "--to", "64")
    assert moved.returncode == 0, moved.stderr
    assert "legacy-16 -> balanced-64: moved 44 streams" in moved.stdout
    assert r.get(LAYOUT_KEY) == b"balanced-64"
    assert not r.keys("ds:{s[0-9][0-9]}:*") and not r.keys("dsforks:{s*")
    assert r.exists(stream_keys_in("chat/3", 64).meta)
    assert r.zscore(stream_keys_in("fork-ttl", 64).fork_deadlines, "fork-ttl")  # its deadline moved too
    assert 3_500_000 < r.pttl(stream_keys_in("blob", 64).meta) < 4_000_000  # TTLs kept

    again = dsgw(own_redis.url, "reshard", "--to", "64")  # idempotent: nothing left to move
    assert again.returncode == 0 and "moved 0 streams" in again.stdout

    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="64", DSGW_SINK_STREAMS="-")
    try:
        assert read_back(gw.url) == before
        producer = {**JSON, "producer-id": "p1", "producer-epoch": "2"}
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            duplicate = c.post("/v1/stream/prod", headers={**producer, "producer-seq": "2"}, content=b"[1]")
            assert duplicate.status_code == 204  # the producer's state moved with the stream
            gap = c.post("/v1/stream/prod", headers={**producer, "producer-seq": "9"}, content=b"[1]")
            assert gap.status_code == 409
            closed = c.post("/v1/stream/chat/0", headers=JSON, content=b"[1]")
            assert closed.status_code == 409
    finally:
        gw.stop()


def test_an_interrupted_reshard_is_finished_by_a_rerun(own_redis, tmp_path):
    r = redis.Redis.from_url(own_redis.url)
    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="16", DSGW_SINK_STREAMS="-")
    try:
        write_streams(gw.url)
        before = read_back(gw.url)
    finally:
        gw.stop()
    # As if a run died after copying one stream's meta but before deleting it.
    old, new = stream_keys_in("chat/5", 16), stream_keys_in("chat/5", 64)
    r.restore(new.meta, 0, r.dump(old.meta))
    r.set(LAYOUT_KEY, "resharding:legacy-16:balanced-64")
    wrong = dsgw(own_redis.url, "reshard", "--to", "256")
    assert wrong.returncode == 1 and "run `dsgw reshard --to 64`" in wrong.stderr
    done = dsgw(own_redis.url, "reshard", "--to", "64")
    assert done.returncode == 0, done.stderr
    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="64", DSGW_SINK_STREAMS="-")
    try:
        assert read_back(gw.url) == before
    finally:
        gw.stop()


def test_a_feed_the_sink_has_not_drained_is_refused(own_redis, tmp_path):
    r = redis.Redis.from_url(own_redis.url)
    gw = start_gateway(own_redis.url, tmp_path, DSGW_SHARDS="16")  # every JSON stream synced
    try:
        httpx.put(gw.stream_url("synced"), headers=JSON, content=b"[1]")
    finally:
        gw.stop()
    refused = dsgw(own_redis.url, "reshard", "--to", "64")
    assert refused.returncode == 1
    assert "sync feeds hold entries the sink has not acknowledged" in refused.stderr
    assert r.get(LAYOUT_KEY) == b"legacy-16"
    dropped = dsgw(own_redis.url, "reshard", "--to", "64", "--drop-feeds")
    assert dropped.returncode == 0, dropped.stderr
    assert not r.exists(feed_key(0, 16))
