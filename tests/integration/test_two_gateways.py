"""Two independent gateway processes on one Redis: writes racing through both
never break producer, Stream-Seq or closure semantics, and live readers on one
are woken by appends through the other."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from gateway.keys import stream_keys

TEXT = {"content-type": "text/plain"}
ROUNDS = 25


async def _race(client: httpx.AsyncClient, *requests: tuple[str, str, dict, bytes]) -> list[int]:
    responses = await asyncio.gather(
        *(
            client.request(method, url, headers=headers, content=body)
            for method, url, headers, body in requests
        )
    )
    return [r.status_code for r in responses]


async def test_same_producer_seq_through_two_gateways_is_written_once(
    gateway, gateway_b, unique, redis_server
):
    r = redis.Redis.from_url(redis_server.url)
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(ROUNDS):
            name = f"{unique}-{n}"
            await client.put(gateway.stream_url(name), headers=TEXT)
            for seq in range(3):
                headers = {**TEXT, "producer-id": "writer", "producer-epoch": "0", "producer-seq": str(seq)}
                statuses = await _race(
                    client,
                    ("POST", gateway.stream_url(name), headers, f"m{seq}".encode()),
                    ("POST", gateway_b.stream_url(name), headers, f"m{seq}".encode()),
                )
                assert sorted(statuses) == [200, 204], statuses
            assert r.xlen(stream_keys(name).data) == 3
            assert (await client.get(gateway_b.stream_url(name))).content == b"m0m1m2"


async def test_same_stream_seq_through_two_gateways_is_accepted_once(
    gateway, gateway_b, unique, redis_server
):
    r = redis.Redis.from_url(redis_server.url)
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(ROUNDS):
            name = f"{unique}-{n}"
            await client.put(gateway.stream_url(name), headers=TEXT)
            headers = {**TEXT, "stream-seq": "0001"}
            statuses = await _race(
                client,
                ("POST", gateway.stream_url(name), headers, b"a"),
                ("POST", gateway_b.stream_url(name), headers, b"b"),
            )
            assert sorted(statuses) == [204, 409], statuses
            assert r.xlen(stream_keys(name).data) == 1


async def test_close_racing_appends_leaves_no_data_after_the_close(gateway, gateway_b, unique):
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(ROUNDS):
            url_a, url_b = gateway.stream_url(f"{unique}-{n}"), gateway_b.stream_url(f"{unique}-{n}")
            await client.put(url_a, headers=TEXT)
            responses = await asyncio.gather(
                client.post(url_a, headers={**TEXT, "stream-closed": "true"}),
                *(client.post(url_b, headers=TEXT, content=f"<{i}>".encode()) for i in range(4)),
            )
            close, appends = responses[0], responses[1:]
            assert close.status_code == 204 and close.headers["stream-closed"] == "true"
            accepted = [a for a in appends if a.status_code == 204]
            refused = [a for a in appends if a.status_code == 409]
            assert len(accepted) + len(refused) == 4
            assert all(a.headers["stream-closed"] == "true" for a in refused)
            final = await client.get(url_b)
            assert final.headers["stream-closed"] == "true"
            # Every accepted append, and nothing else, is in the stream.
            assert len(final.content) == sum(len(a.request.content) for a in accepted)
            assert final.headers["stream-next-offset"] == close.headers["stream-next-offset"]


async def test_long_poll_on_one_gateway_wakes_for_an_append_through_the_other(
    redis_server, tmp_path_factory, unique
):
    from tests.conftest import start_gateway

    # A long wait and no periodic re-check: only the notification can wake the reader.
    slow = {"DSGW_LONG_POLL_TIMEOUT_MS": "20000", "DSGW_LIVE_RECHECK_MS": "60000"}
    log_dir = tmp_path_factory.mktemp("wake")
    a = start_gateway(redis_server.url, log_dir, **slow)
    b = start_gateway(redis_server.url, log_dir, **slow)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.put(a.stream_url(unique), headers=TEXT)
            for round_no in range(3):
                poll = asyncio.create_task(
                    client.get(a.stream_url(unique), params={"offset": "now", "live": "long-poll"})
                )
                await asyncio.sleep(0.3)
                assert not poll.done()
                sent = time.monotonic()
                await client.post(b.stream_url(unique), headers=TEXT, content=f"r{round_no}".encode())
                response = await poll
                waited = time.monotonic() - sent
                assert response.status_code == 200 and response.content == f"r{round_no}".encode()
                assert waited < 5, f"woken after {waited:.1f}s: by the timeout, not the notification"

            # SSE on A sees B's appends the same way.
            async with client.stream(
                "GET", a.stream_url(unique), params={"offset": "now", "live": "sse"}
            ) as sse:
                lines = sse.aiter_lines()
                assert await anext(lines) == "event: control"
                await client.post(b.stream_url(unique), headers=TEXT, content=b"via-b")
                seen = []
                async for line in lines:
                    seen.append(line)
                    if line == "data:via-b":
                        break
                assert "event: data" in seen
    finally:
        a.stop()
        b.stop()


async def test_waiting_readers_hold_no_redis_connection(redis_server, tmp_path_factory, unique):
    from tests.conftest import start_gateway

    # Four Redis connections for the whole process (one of them the pub/sub
    # one), a hundred readers: only possible if waiting readers hold none.
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("pool"),
        DSGW_REDIS_MAX_CONNECTIONS="4",
        DSGW_LONG_POLL_TIMEOUT_MS="20000",
        DSGW_LIVE_RECHECK_MS="60000",
    )
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            url = gw.stream_url(unique)
            tail = (await client.put(url, headers=TEXT)).headers["stream-next-offset"]
            # The tail offset, not `now`: a poll that reaches the gateway only
            # after the append (a busy machine) still gets it instead of waiting.
            polls = [
                asyncio.create_task(client.get(url, params={"offset": tail, "live": "long-poll"}))
                for _ in range(100)
            ]
            await asyncio.sleep(1.0)
            assert not any(p.done() for p in polls)
            await client.post(url, headers=TEXT, content=b"wake")
            responses = await asyncio.gather(*polls)
        assert [resp.status_code for resp in responses] == [200] * 100, [
            (r.status_code, r.text[:80]) for r in responses if r.status_code != 200
        ][:3]
        assert all(resp.content == b"wake" for resp in responses)
        mine = [c for c in r.client_list() if c["name"] == f"dsgw-gateway-{gw.proc.pid}"]
        assert 1 <= len(mine) <= 4
    finally:
        gw.stop()


@pytest.mark.parametrize("mode", ["long-poll", "sse"])
async def test_reader_sees_deletion_and_recreation_cleanly(gateway, unique, mode):
    async with httpx.AsyncClient(timeout=10) as client:
        url = gateway.stream_url(unique)
        await client.put(url, headers=TEXT, content=b"old")
        await client.delete(url)
        assert (await client.get(url, params={"offset": "-1", "live": mode})).status_code == 404
        await client.put(url, headers=TEXT, content=b"new")
        assert (await client.get(url)).content == b"new"


def _read_calls(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('dsgw_redis_call_seconds_count{op="read"}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_wake_costs_one_read_per_replica_not_one_per_reader(redis_server, tmp_path_factory, unique):
    from tests.conftest import start_gateway

    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("fanout"),
        DSGW_LONG_POLL_TIMEOUT_MS="20000",
        DSGW_LIVE_RECHECK_MS="60000",
    )
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            url = gw.stream_url(unique)
            await client.put(url, headers=TEXT)
            polls = [
                asyncio.create_task(client.get(url, params={"offset": "now", "live": "long-poll"}))
                for _ in range(60)
            ]
            await asyncio.sleep(1.0)
            before = _read_calls((await client.get(gw.url + "/metrics")).text)
            await client.post(url, headers=TEXT, content=b"one")
            responses = await asyncio.gather(*polls)
            after = _read_calls((await client.get(gw.url + "/metrics")).text)
        assert [r.content for r in responses] == [b"one"] * 60
        assert after - before <= 3, f"{after - before} reads for one wake of 60 readers"
    finally:
        gw.stop()
