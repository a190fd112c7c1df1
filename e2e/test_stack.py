"""End to end, through nginx in front of three gateway replicas on a 3-master
Redis Cluster, with Postgres and the sync workers: the official suite,
cross-replica delivery, replicas killed and drained, and the seed scenarios
of a durable session. Tests run in file order; the fault tests come last."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import asyncpg
import httpx

from e2e import stack as stack_module
from e2e.bench_fanout import measure, report
from e2e.conformance import EXPECTED_TESTS, run_suite
from e2e.conftest import start_session_stack
from tests.conftest import wait_until

JSON = {"content-type": "application/json"}


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_the_stack_is_three_replicas_on_a_cluster(stack):
    assert stack.redis_mode == "cluster" and len(stack.gateways) == 3
    assert len(stack.find("redis")) == 3


def test_official_suite_through_the_balancer_on_the_cluster(stack):
    result = run_suite(stack.base_url, quiet=True)
    print(result.summary())
    assert result.failures == []
    assert (result.passed, result.failed) == (EXPECTED_TESTS, 0)


async def test_every_replica_delivers_appends_made_through_every_other(stack):
    async with httpx.AsyncClient(timeout=10) as client:
        name = new_name("cross")
        await client.put(f"{stack.gateways[0]}/v1/stream/{name}", headers=JSON)
        for reader in stack.gateways:
            for writer in stack.gateways:
                url = f"{reader}/v1/stream/{name}"
                poll = asyncio.create_task(client.get(url, params={"offset": "now", "live": "long-poll"}))
                await asyncio.sleep(0.05)
                body = json.dumps({"from": writer, "to": reader}).encode()
                await client.post(f"{writer}/v1/stream/{name}", headers=JSON, content=body)
                response = await poll
                assert response.status_code == 200, (reader, writer)
                assert response.json() == [json.loads(body)]


async def test_delivery_latency_same_vs_cross_replica(stack):
    results = await measure(stack.gateways, rounds=100)
    print("\n" + report(results))
    assert len(results["same replica"]) == len(results["cross replica"]) == 100


# --- the seed scenarios of a durable session ------------------------------------------


async def test_session_lifecycle_with_presence(stack):
    session = new_name("session")
    url = f"{stack.base_url}/v1/stream/{session}"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.put(url, headers=JSON)).status_code == 201
        events = [
            {"type": "presence", "key": "alice", "operation": "insert", "value": {"status": "online"}},
            {"type": "message", "key": "m1", "value": {"from": "alice", "text": "hello"}},
            {"type": "presence", "key": "alice", "operation": "update", "value": {"status": "away"}},
        ]
        for event in events:
            assert (
                await client.post(url, headers=JSON, content=json.dumps(event).encode())
            ).status_code == 204
        closed = await client.post(url, headers={"stream-closed": "true"})
        assert closed.status_code == 204 and closed.headers["stream-closed"] == "true"
        read = await client.get(url)
        assert read.json() == events and read.headers["stream-closed"] == "true"
    pg = await asyncpg.connect(stack.database_url)
    try:

        async def presence():  # type: ignore[no-untyped-def]
            return await pg.fetch(
                "SELECT DISTINCT ON (event_key) event_key, payload->'value'->>'status' AS status"
                " FROM session_events WHERE stream_name = $1 AND event_type = 'presence'"
                " ORDER BY event_key, ds_offset DESC",
                session,
            )

        async def all_rows():  # type: ignore[no-untyped-def]
            n = await pg.fetchval("SELECT count(*) FROM session_events WHERE stream_name = $1", session)
            return n if n == 3 else None

        assert await wait_until(all_rows) == 3
        assert [(r["event_key"], r["status"]) for r in await presence()] == [("alice", "away")]
    finally:
        await pg.close()


async def test_multi_producer_chat_keeps_each_producers_order(stack):
    url = f"{stack.base_url}/v1/stream/{new_name('chat')}"
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(url, headers=JSON)

        async def produce(producer: str, count: int) -> None:
            for seq in range(count):
                headers = {**JSON, "producer-id": producer, "producer-epoch": "0", "producer-seq": str(seq)}
                body = json.dumps({"from": producer, "seq": seq}).encode()
                assert (await client.post(url, headers=headers, content=body)).status_code == 200

        await asyncio.gather(produce("user", 40), produce("ai", 40))
        messages = (await client.get(url)).json()
    assert len(messages) == 80
    for producer in ("user", "ai"):
        assert [m["seq"] for m in messages if m["from"] == producer] == list(range(40))


async def test_sse_live_delivery_through_the_balancer(stack):
    url = f"{stack.base_url}/v1/stream/{new_name('sse')}"
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(url, headers=JSON)
        received: list[dict] = []
        async with client.stream("GET", url, params={"offset": "now", "live": "sse"}) as sse:
            lines = sse.aiter_lines()
            assert await anext(lines) == "event: control"
            for i in range(3):
                await client.post(url, headers=JSON, content=json.dumps({"n": i}).encode())
            event = None
            async for line in lines:
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "data":
                    received.extend(json.loads(line[5:]))
                    if len(received) == 3:
                        break
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_recovery_from_a_saved_offset(stack):
    url = f"{stack.base_url}/v1/stream/{new_name('resume')}"
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(url, headers=JSON, content=b'[{"n":1},{"n":2}]')
        saved = (await client.get(url)).headers["stream-next-offset"]
        await client.post(url, headers=JSON, content=b'[{"n":3},{"n":4}]')
        resumed = await client.get(url, params={"offset": saved})
        assert resumed.json() == [{"n": 3}, {"n": 4}]


async def test_producer_idempotency_200_duplicate_204_next_200(stack):
    url = f"{stack.base_url}/v1/stream/{new_name('idem')}"
    producer = {**JSON, "producer-id": "writer-1", "producer-epoch": "0"}
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(url, headers=JSON)
        first = await client.post(url, headers={**producer, "producer-seq": "0"}, content=b'{"n":0}')
        again = await client.post(url, headers={**producer, "producer-seq": "0"}, content=b'{"n":0}')
        nxt = await client.post(url, headers={**producer, "producer-seq": "1"}, content=b'{"n":1}')
        assert (first.status_code, again.status_code, nxt.status_code) == (200, 204, 200)
        assert (await client.get(url)).json() == [{"n": 0}, {"n": 1}]


async def _publish(stack, table: str, stream: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "publish", table, "--stream", stream],
        env={**os.environ, "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


async def test_postgres_insert_reaches_a_stream_and_round_trips_to_session_events(stack):
    table = "todos_" + uuid.uuid4().hex[:8]
    stream = f"pg/{table}"
    pg = await asyncpg.connect(stack.database_url)
    try:
        await pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text)")
        await _publish(stack, table, stream)  # creates the stream too
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{stack.base_url}/v1/stream/{stream}"
            async with client.stream("GET", url, params={"offset": "now", "live": "sse"}) as sse:
                lines = sse.aiter_lines()
                assert await anext(lines) == "event: control"
                inserted = time.monotonic()
                await pg.execute(f"INSERT INTO {table} VALUES (1, 'write tests')")
                event, messages = None, None
                async for line in lines:
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "data":
                        messages = json.loads(line[5:])
                        break
            # Woken by the source's notification: the periodic re-check is 30 s
            # away and the SSE connection ends after 10 s.
            assert messages is not None and time.monotonic() - inserted < 10
        assert messages[0]["type"] == table and messages[0]["key"] == "1"
        assert messages[0]["value"] == {"id": 1, "title": "write tests"}
        assert messages[0]["headers"]["operation"] == "insert"

        # The published stream is itself synced: the change comes back as a row.
        async def row():  # type: ignore[no-untyped-def]
            return await pg.fetchrow("SELECT * FROM session_events WHERE stream_name = $1", stream)

        synced = await wait_until(row)
        assert (
            synced["event_type"] == table and synced["event_key"] == "1" and synced["operation"] == "insert"
        )
    finally:
        await pg.close()


async def test_stream_event_reaches_session_events(stack):
    name = new_name("to-pg")
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(f"{stack.base_url}/v1/stream/{name}", headers=JSON)
        await client.post(
            f"{stack.base_url}/v1/stream/{name}",
            headers=JSON,
            content=b'{"type":"note","key":"k1","text":"x"}',
        )
    pg = await asyncpg.connect(stack.database_url)
    try:

        async def row():  # type: ignore[no-untyped-def]
            return await pg.fetchrow("SELECT * FROM session_events WHERE stream_name = $1", name)

        synced = await wait_until(row)
        assert (synced["event_type"], synced["event_key"]) == ("note", "k1")
    finally:
        await pg.close()


# --- faults (last: they take replicas away) -------------------------------------------


async def _sse_client(
    base_url: str, name: str, total: int, received: list[int], reconnects: list[int]
) -> None:
    """Reads `name` over SSE through the balancer; on any break, reconnects
    from the last offset it was given, until it holds `total` messages."""
    offset = "-1"
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5)) as client:
        while len(received) < total:
            try:
                async with client.stream(
                    "GET", f"{base_url}/v1/stream/{name}", params={"offset": offset, "live": "sse"}
                ) as sse:
                    event = None
                    pending: list[int] = []
                    async for line in sse.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "data":
                            pending.extend(m["n"] for m in json.loads(line[5:]))
                        elif line.startswith("data:") and event == "control":
                            # Data counts once its control (and offset) arrived: a
                            # break in between replays it from the previous offset.
                            offset = json.loads(line[5:])["streamNextOffset"]
                            received.extend(pending)
                            pending = []
                            if len(received) >= total:
                                return
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            reconnects.append(1)
            await asyncio.sleep(0.05)


async def _produce_with_retries(base_url: str, name: str, total: int, rate_s: float) -> int:
    """Appends 0..total-1 as one idempotent producer, retrying every failure
    with the same seq (so a retry of an append that did land is a 204)."""
    retries = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, connect=2)) as client:
        for seq in range(total):
            headers = {**JSON, "producer-id": "e2e-producer", "producer-epoch": "0", "producer-seq": str(seq)}
            while True:
                try:
                    r = await client.post(
                        f"{base_url}/v1/stream/{name}",
                        headers=headers,
                        content=json.dumps({"n": seq}).encode(),
                    )
                    if r.status_code in (200, 204):
                        break
                except httpx.TransportError:
                    pass
                retries += 1
                await asyncio.sleep(0.05)
            await asyncio.sleep(rate_s)
    return retries


async def test_sigkill_of_a_replica_during_sse_loses_and_repeats_nothing(stack):
    name = new_name("kill")
    total, clients = 300, 6
    async with httpx.AsyncClient(timeout=10) as client:
        await client.put(f"{stack.base_url}/v1/stream/{name}", headers=JSON)
    received: list[list[int]] = [[] for _ in range(clients)]
    reconnects: list[list[int]] = [[] for _ in range(clients)]
    readers = [
        asyncio.create_task(_sse_client(stack.base_url, name, total, received[i], reconnects[i]))
        for i in range(clients)
    ]
    producer = asyncio.create_task(_produce_with_retries(stack.base_url, name, total, 0.01))
    await wait_until(lambda: _at_least(received, 100), timeout_s=60, every_s=0.01)
    victim = stack.find("gateway")[0]
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(producer, 120)
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    for got in received:
        assert got == list(range(total))
    # Clients on the killed replica (round-robin put some there) had to reconnect.
    assert sum(len(r) for r in reconnects) >= 1


async def _at_least(received: list[list[int]], n: int) -> bool:
    return all(len(r) >= n for r in received)


async def test_sigterm_drains_a_replica(stack):
    victim = next(p for p in stack.find("gateway") if stack_module.is_ours(p))
    base = f"http://127.0.0.1:{victim.port}"
    name = new_name("drain")
    async with httpx.AsyncClient(timeout=30) as client:
        await client.put(f"{base}/v1/stream/{name}", headers=JSON)

        async def sse_ends_cleanly() -> list[str]:
            lines = []
            async with client.stream(
                "GET", f"{base}/v1/stream/{name}", params={"offset": "-1", "live": "sse"}
            ) as r:
                async for line in r.aiter_lines():  # raises if the connection is cut
                    lines.append(line)
            return lines

        sse_sessions = [asyncio.create_task(sse_ends_cleanly()) for _ in range(4)]
        await asyncio.sleep(0.5)
        appends = [
            asyncio.create_task(
                client.post(f"{base}/v1/stream/{name}", headers=JSON, content=json.dumps({"i": i}).encode())
            )
            for i in range(30)
        ]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        os.kill(victim.pid, signal.SIGTERM)
        results = await asyncio.gather(*appends, return_exceptions=True)
        sessions = await asyncio.gather(*sse_sessions)
        accepted = [r for r in results if isinstance(r, httpx.Response)]
        assert all(r.status_code == 204 for r in accepted)
        assert all(s and s[0] == "event: control" for s in sessions)
        # Every append that was accepted is in the stream, read through the others.
        stored = (await client.get(f"{stack.base_url}/v1/stream/{name}")).json()
        assert len(stored) == len(accepted)
    deadline = time.monotonic() + 15
    while stack_module.is_ours(victim) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not stack_module.is_ours(victim), "the replica did not exit after draining"
    assert time.monotonic() - started < 10


def test_stack_down_stops_everything_it_started(stack):
    procs = list(stack.procs)
    stack_module.down()
    assert not any(stack_module.is_ours(p) for p in procs)
    # Later files share the session's stack: start a fresh one in its place,
    # which also shows that `up` works again after `down`.
    vars(stack).update(vars(start_session_stack()))
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
