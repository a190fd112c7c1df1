"""Reliability of the gateway's request paths (issue "Reliability"): reads
bounded by bytes inside Redis, writes never resent after a timeout, no stale
connections after a Redis restart, and live readers that cannot pin a replica:
departed clients released at once, stalled SSE readers cut off, a cap on live
connections. Each test runs its own redis-server and gateway processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from gateway.embedded import RedisProcess, start_redis
from gateway.keys import stream_keys
from tests.conftest import GatewayProcess, start_gateway


@pytest.fixture
def own_redis(tmp_path: Path):
    server = start_redis(tmp_path / "redis", persistent=True)
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def gateway_on(server: RedisProcess, tmp_path: Path, **env: str) -> GatewayProcess:
    return start_gateway(server.url, tmp_path, **env)


def redis_output_bytes(server: RedisProcess) -> int:
    client = redis.Redis(port=server.port)
    try:
        return int(client.info("stats")["total_net_output_bytes"])
    finally:
        client.close()


def metric(gw: GatewayProcess, prefix: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def fill_json(url: str, messages: int, size: int, per_append: int = 10) -> None:
    text = "x" * size
    for start in range(0, messages, per_append):
        batch = [{"n": start + i, "pad": text} for i in range(min(per_append, messages - start))]
        response = httpx.post(url, json=batch, timeout=30)
        assert response.status_code == 204, response.text


# --- reads bounded by bytes ---------------------------------------------------------


def test_a_fork_sub_offset_reads_one_append_at_most(own_redis, tmp_path):
    """PUT fork with a huge sub-offset on a large stream: 400, and Redis sends
    back about one append, not the whole stream."""
    gw = gateway_on(own_redis, tmp_path)
    try:
        source = gw.stream_url("big-source")
        assert httpx.put(source, headers={"content-type": "application/json"}).status_code == 201
        fill_json(source, messages=2000, size=5000, per_append=100)  # ~10 MB
        before = redis_output_bytes(own_redis)
        response = httpx.put(
            gw.stream_url("big-fork"),
            headers={
                "stream-forked-from": "/v1/stream/big-source",
                "stream-fork-offset": "0000000000000000_0000000000000000",
                "stream-fork-sub-offset": "9007199254740991",
            },
            timeout=30,
        )
        moved = redis_output_bytes(own_redis) - before
        assert response.status_code == 400, response.text
        assert "beyond the next append" in response.text
        assert moved < 1_000_000, f"Redis sent {moved} bytes for one refused fork"
    finally:
        gw.stop()


def test_reads_of_large_messages_stop_by_bytes_inside_redis(own_redis, tmp_path):
    """30 messages of 1 MiB: a catch-up returns whole appends up to the chunk
    size, and Redis sends about that much, not the 1,000 entries it used to."""
    gw = gateway_on(own_redis, tmp_path)
    try:
        url = gw.stream_url("large-messages")
        assert httpx.put(url, headers={"content-type": "application/json"}).status_code == 201
        fill_json(url, messages=30, size=1 << 20, per_append=1)
        before = redis_output_bytes(own_redis)
        response = httpx.get(url, params={"offset": "-1"}, timeout=30)
        moved = redis_output_bytes(own_redis) - before
        assert response.status_code == 200
        assert [m["n"] for m in response.json()] == [0]  # one message crosses the 1 MiB chunk
        assert moved < 3 << 20, f"Redis sent {moved} bytes for a 1 MiB response"
        # Following Stream-Next-Offset still yields every message once, in order.
        seen, offset = [], "-1"
        for _ in range(40):
            page = httpx.get(url, params={"offset": offset}, timeout=30)
            seen += [m["n"] for m in page.json()]
            offset = page.headers["stream-next-offset"]
            if page.headers.get("stream-up-to-date") == "true":
                break
        assert seen == list(range(30))
    finally:
        gw.stop()


def test_a_chunk_limit_inside_a_large_append_reads_its_rest_in_one_go(own_redis, tmp_path):
    """Two appends of 6,000 small messages (~1.3 MB): the 1 MiB chunk limit
    falls inside the second, which is still returned whole, and collect.lua
    fetches the rest of it with one XRANGE instead of one per entry."""
    gw = gateway_on(own_redis, tmp_path)
    client = redis.Redis(port=own_redis.port)
    try:
        url = gw.stream_url("big-appends")
        assert httpx.put(url, headers={"content-type": "application/json"}).status_code == 201
        fill_json(url, messages=12_000, size=80, per_append=6_000)
        client.config_resetstat()
        response = httpx.get(url, params={"offset": "-1"}, timeout=30)
        assert response.status_code == 200
        assert [m["n"] for m in response.json()] == list(range(12_000))
        calls = int(client.info("commandstats")["cmdstat_xrange"]["calls"])
        # Batches of at most 1,024 entries: 12 of them, plus the first entry alone
        # and the one past the limit. One entry at a time past the limit was ~2,000.
        assert calls <= 15, f"{calls} XRANGE calls for one read"
    finally:
        client.close()
        gw.stop()


# --- writes never resent ------------------------------------------------------------


def test_a_write_that_times_out_answers_503_and_is_never_resent(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_REDIS_TIMEOUT_MS="300")
    url = gw.stream_url("stalled")
    producer = {"producer-id": "p1", "producer-epoch": "0", "content-type": "application/json"}
    try:
        assert httpx.put(url, headers={"content-type": "application/json"}).status_code == 201
        # Loads the append script: a stalled EVALSHA must be one that runs.
        assert (
            httpx.post(url, headers={**producer, "producer-seq": "0"}, content=b'{"a":0}').status_code == 200
        )
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # Redis takes the command, answers nothing
        try:
            response = httpx.post(
                url, headers={**producer, "producer-seq": "1"}, content=b'{"a":1}', timeout=10
            )
        finally:
            time.sleep(0.5)
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        time.sleep(0.5)
        # The script ran once when Redis resumed; the gateway never sent it again.
        assert httpx.get(url, params={"offset": "-1"}).json() == [{"a": 0}, {"a": 1}]
        # The client's retry is made safe by the producer rules: a duplicate.
        retry = httpx.post(url, headers={**producer, "producer-seq": "1"}, content=b'{"a":1}', timeout=10)
        assert retry.status_code == 204
        assert httpx.get(url, params={"offset": "-1"}).json() == [{"a": 0}, {"a": 1}]
        assert metric(gw, 'dsgw_responses_total{method="POST",status="503"}') == 1
    finally:
        gw.stop()


def test_no_stale_connection_errors_after_a_redis_restart(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path)
    url = gw.stream_url("restarted")
    try:
        assert httpx.put(url, headers={"content-type": "application/json"}).status_code == 201
        assert httpx.post(url, json=[0]).status_code == 204
        # A live reader across the restart must get later messages (or, if its
        # stream ends, a control event to resume from: never a silent end).
        received: list[str] = []
        reader = threading.Thread(target=_read_sse, args=(url, received, 20.0), daemon=True)
        reader.start()
        time.sleep(0.5)
        own_redis.proc.kill()
        own_redis.proc.wait()
        restarted = start_redis(own_redis.data_dir, port=own_redis.port, persistent=True)
        own_redis.proc = restarted.proc
        deadline = time.monotonic() + 15
        while httpx.get(f"{gw.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready again"
            time.sleep(0.1)
        statuses = [httpx.post(url, json=[i]).status_code for i in range(1, 51)]
        assert statuses == [204] * 50
        reads = [httpx.get(url, params={"offset": "-1"}).status_code for _ in range(20)]
        assert reads == [200] * 20
        reader.join(25)
        data = [json.loads(e.removeprefix("data:")) for e in received if e.startswith("data:")]
        flat = [m for batch in data for m in batch]
        assert flat[-1] == 50 or received[-1].startswith("control:"), received[-3:]
    finally:
        gw.stop()


def _read_sse(url: str, events: list[str], seconds: float) -> None:
    """Collect 'data:<json>' and 'control:<json>' lines of an SSE stream."""
    with httpx.stream("GET", url, params={"offset": "-1", "live": "sse"}, timeout=seconds) as response:
        kind = ""
        deadline = time.monotonic() + seconds
        try:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append(f"{kind}:{line[5:]}")
                    if kind == "data" and 50 in json.loads(line[5:]):
                        return
                if time.monotonic() > deadline:
                    return
        except httpx.HTTPError:
            return


# --- live readers cannot pin a replica -------------------------------------------------


def test_a_departed_long_poll_is_released_at_once(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_LONG_POLL_TIMEOUT_MS="30000")
    try:
        url = gw.stream_url("departed")
        created = httpx.put(url, headers={"content-type": "application/json"})
        tail = created.headers["stream-next-offset"]
        sock = socket.create_connection(("127.0.0.1", gw.port))
        request = f"GET /v1/stream/departed?offset={tail}&live=long-poll HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request.encode())
        _wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="long-poll"}') == 1, 5)
        sock.close()
        # Released within a moment, not after the 30 s long-poll timeout.
        _wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="long-poll"}') == 0, 3)
    finally:
        gw.stop()


def test_live_connections_are_capped_per_replica(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_MAX_LIVE_CONNECTIONS="2", DSGW_LONG_POLL_TIMEOUT_MS="3000")
    try:
        url = gw.stream_url("capped")
        tail = httpx.put(url, headers={"content-type": "application/json"}).headers["stream-next-offset"]
        params = {"offset": tail, "live": "long-poll"}
        waiting = [threading.Thread(target=httpx.get, args=(url,), kwargs={"params": params, "timeout": 10})
                   for _ in range(2)]  # fmt: skip
        for thread in waiting:
            thread.start()
        _wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="long-poll"}') == 2, 5)
        refused = httpx.get(url, params=params, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        refused_sse = httpx.get(url, params={"offset": tail, "live": "sse"}, timeout=10)
        assert refused_sse.status_code == 503
        assert httpx.get(url, params={"offset": "-1"}).status_code == 200  # catch-up is not capped
        for thread in waiting:
            thread.join(10)
        assert metric(gw, "dsgw_live_refused_total") == 2
    finally:
        gw.stop()


def test_a_stalled_sse_reader_is_cut_off_and_can_resume(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_SSE_SEND_TIMEOUT_MS="1000")
    try:
        url = gw.stream_url("stalled-reader")
        tail = httpx.put(url, headers={"content-type": "text/plain"}).headers["stream-next-offset"]
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", gw.port))
        path = f"/v1/stream/stalled-reader?offset={tail}&live=sse"
        stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # and never reads
        healthy: list[str] = []
        reader = threading.Thread(
            target=_read_text_sse, args=(url, tail, healthy, 8 << 20, 30.0), daemon=True
        )
        reader.start()
        _wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="sse"}') == 2, 5)
        chunk = b"y" * (1 << 20)
        for _ in range(8):
            assert httpx.post(url, headers={"content-type": "text/plain"}, content=chunk).status_code == 204
        _wait_for(lambda: metric(gw, "dsgw_sse_cut_off_total") == 1, 10)
        _wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="sse"}') <= 1, 5)
        reader.join(30)
        assert sum(len(x) for x in healthy) == 8 << 20  # the other reader got everything
        stalled.close()
        # A cut-off reader resumes from its last offset like any other.
        received, offset = 0, tail
        for _ in range(10):
            page = httpx.get(url, params={"offset": offset}, timeout=30)
            received += len(page.content)
            offset = page.headers["stream-next-offset"]
            if page.headers.get("stream-up-to-date") == "true":
                break
        assert received == 8 << 20
    finally:
        gw.stop()


def _read_text_sse(url: str, offset: str, chunks: list[str], total: int, seconds: float) -> None:
    params = {"offset": offset, "live": "sse"}
    with httpx.stream("GET", url, params=params, timeout=seconds) as response:
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "data":
                chunks.append(line[5:])
                if sum(len(x) for x in chunks) >= total:
                    return


def _wait_for(predicate, seconds: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --- smaller ones -------------------------------------------------------------------------


def test_long_poll_timeouts_carry_cache_control_and_etags_match_lists(gateway, unique):
    url = gateway.stream_url(unique)
    tail = httpx.put(url, headers={"content-type": "application/json"}).headers["stream-next-offset"]
    timeout = httpx.get(url, params={"offset": tail, "live": "long-poll"}, timeout=10)
    assert timeout.status_code == 204
    assert timeout.headers["cache-control"] == "no-store"
    httpx.post(url, json=[1])
    first = httpx.get(url, params={"offset": "-1"})
    etag = first.headers["etag"]
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        again = httpx.get(url, params={"offset": "-1"}, headers={"if-none-match": header})
        assert again.status_code == 304, header
    assert httpx.get(url, params={"offset": "-1"}, headers={"if-none-match": '"other"'}).status_code == 200


def test_a_post_without_content_type_names_the_streams_type(gateway, unique):
    url = gateway.stream_url(unique)
    httpx.put(url, headers={"content-type": "application/json"})
    wrong = httpx.post(url, headers={"content-type": "text/plain"}, content=b"x")
    assert wrong.status_code == 409
    assert "application/json" in wrong.json()["detail"]


def test_producer_state_is_bounded_per_stream(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_MAX_PRODUCERS_PER_STREAM="20")
    try:
        url = gw.stream_url("many-producers")
        assert httpx.put(url, headers={"content-type": "application/json"}).status_code == 201

        def append(pid: str, seq: int) -> httpx.Response:
            headers = {"producer-id": pid, "producer-epoch": "0", "producer-seq": str(seq)}
            return httpx.post(url, headers={**headers, "content-type": "application/json"}, content=b"[1]")

        client = redis.Redis(port=own_redis.port)
        producers_key = stream_keys("many-producers").producers
        for i in range(60):
            assert append(f"p{i}", 0).status_code == 200
            assert client.hlen(producers_key) <= 20
        client.close()
        assert append("p59", 0).status_code == 204  # recent: still deduplicated
        forgotten = append("p0", 1)  # the oldest was forgotten: it must start over
        assert forgotten.status_code == 409
        assert forgotten.headers["producer-expected-seq"] == "0"
        too_long = append("x" * 257, 0)
        assert too_long.status_code == 400
        assert "Producer-Id" in too_long.json()["title"]
    finally:
        gw.stop()


def test_expired_forks_nobody_touches_are_removed_and_release_their_source(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path, DSGW_FORK_SWEEP_MS="300")
    try:
        source, fork = gw.stream_url("sweep-source"), gw.stream_url("sweep-fork")
        assert (
            httpx.put(source, headers={"content-type": "application/json"}, content=b"[1]").status_code == 201
        )
        forked = httpx.put(fork, headers={"stream-forked-from": "/v1/stream/sweep-source", "stream-ttl": "1"})
        assert forked.status_code == 201
        assert httpx.delete(source).status_code == 204  # soft: the fork still reads through it
        assert httpx.get(source, params={"offset": "-1"}).status_code == 410
        client = redis.Redis(port=own_redis.port)
        try:
            # Nobody touches the fork again: the sweeper removes it after its TTL,
            # which releases the source, which then goes too.
            _wait_for(lambda: not client.exists(stream_keys("sweep-fork").meta), 10)
            _wait_for(lambda: not client.exists(stream_keys("sweep-source").meta), 5)
            assert client.zcard(stream_keys("sweep-fork").fork_deadlines) == 0
        finally:
            client.close()
        assert httpx.get(source, params={"offset": "-1"}).status_code == 404
    finally:
        gw.stop()


async def test_a_fork_made_while_its_source_is_deleted_keeps_its_inherited_data(own_redis):
    """The window between taking the reference on the source and creating the
    fork: a delete of the source then must not take the reference for a
    vanished fork's (and drop the source's data)."""
    from gateway.protocol import JSON_MEDIA_TYPE
    from gateway.redis_mux import RedisMux
    from gateway.store import Store
    from gateway.store_model import ForkRequest

    mux = RedisMux(own_redis.url, timeout_s=5)
    store = Store(mux)
    try:
        await store.create_json_stream("race-source")
        first = await store.append("race-source", JSON_MEDIA_TYPE, ["1", "2"])
        await store.append("race-source", JSON_MEDIA_TYPE, ["3", "4"])
        prefix = store._sub_offset_prefix

        async def delete_source_meanwhile(*args):  # type: ignore[no-untyped-def]
            await store.delete("race-source")  # soft: the fork's reference is there
            return await prefix(*args)

        store._sub_offset_prefix = delete_source_meanwhile  # type: ignore[method-assign]
        created = await store.create(
            "race-fork", content_type="", media_type="", ttl=None, expires_at=None, closed=False, body=None,
            fork=ForkRequest("race-source", first.tail, 1),
        )  # fmt: skip
        assert created.created
        result = await store.read("race-fork", (0, 0), touch=False, max_bytes=1 << 20, max_entries=100)
        assert b"[" + result.body + b"]" == b"[1,2,3]"  # inherited 1,2; the sub-offset's prefix 3
    finally:
        await mux.close()


def test_the_live_subscription_is_a_metric(own_redis, tmp_path):
    gw = gateway_on(own_redis, tmp_path)
    try:
        assert metric(gw, "dsgw_live_subscription_up") == 1
        own_redis.proc.kill()
        own_redis.proc.wait()
        _wait_for(lambda: metric(gw, "dsgw_live_subscription_up") == 0, 10)
        restarted = start_redis(own_redis.data_dir, port=own_redis.port, persistent=True)
        own_redis.proc = restarted.proc
        _wait_for(lambda: metric(gw, "dsgw_live_subscription_up") == 1, 15)
    finally:
        gw.stop()
