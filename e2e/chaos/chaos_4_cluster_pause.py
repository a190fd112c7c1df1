"""Scenario 4: on the 3-master cluster, one master is paused (SIGSTOP) for 8 s
and resumed, under load. No append is duplicated or lost; producers and SSE
readers of streams on the other masters go on as if nothing happened.

The masters run with `cluster-require-full-coverage no`: with Redis's default
(yes), a master unreachable for longer than cluster-node-timeout (5 s) makes
every other master refuse all commands too, by Redis Cluster's own rule, and
no gateway can keep the other shards up then (docs/chaos.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis
from redis.crc import key_slot

from e2e.chaos.tools import (
    JSON,
    Producer,
    SseReader,
    check_exactly_once_in_order,
    client,
    new_name,
    read_all,
    running_stack,
    summarize,
)
from gateway.keys import stream_keys

PAUSE_S = 8.0
PER_MASTER = 3  # streams per master
APPEND_PAUSE_S = 0.05
REDIS_ARGS = ["--cluster-require-full-coverage", "no"]


def master_port_of(redis_url: str, names: list[str]) -> dict[str, int]:
    """The port of the master that owns each stream's slot."""
    r = redis.Redis.from_url(redis_url)
    try:
        ranges = [(lo, hi, int(nodes[1])) for lo, hi, nodes, *_ in r.execute_command("CLUSTER SLOTS")]
    finally:
        r.close()
    owner = {}
    for name in names:
        slot = key_slot(stream_keys(name).data.encode())
        owner[name] = next(port for lo, hi, port in ranges if lo <= slot <= hi)
    return owner


async def test_cluster_master_paused_8s():
    started = time.monotonic()
    with running_stack(redis_mode="cluster", redis_args=REDIS_ARGS) as stack:
        masters = sorted(int(p.cmd_marker) for p in stack.find("redis"))
        # Enough names to give every master PER_MASTER streams.
        by_master: dict[int, list[str]] = {port: [] for port in masters}
        while any(len(v) < PER_MASTER for v in by_master.values()):
            batch = [new_name("cluster") for _ in range(20)]
            for name, port in master_port_of(stack.redis_url, batch).items():
                if len(by_master[port]) < PER_MASTER:
                    by_master[port].append(name)
        victim_port = masters[0]
        victim = next(p for p in stack.find("redis") if int(p.cmd_marker) == victim_port)
        names = [n for port in masters for n in by_master[port]]
        url = {name: f"{stack.base_url}/v1/stream/{name}" for name in names}
        async with client() as http:
            for name in names:
                assert (await http.put(url[name], headers=JSON)).status_code == 201
        producers = {name: Producer(f"p-{name}", url[name]) for name in names}
        readers = {name: SseReader(url[name], total=10**9) for name in names}  # until cancelled
        stop = asyncio.Event()
        load = asyncio.gather(*(p.run(1_000_000, APPEND_PAUSE_S, stop) for p in producers.values()))
        sse_client = client(connections=len(names) + 4, timeout_s=60)
        reading = [asyncio.create_task(r.run(sse_client)) for r in readers.values()]
        try:
            await asyncio.sleep(3)
            paused_at = time.time()
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(PAUSE_S / 2)
                # Readiness degrades per node: every replica stays in the balancer,
                # and its /readyz names the paused master.
                async with client() as http:
                    ready = [await http.get(f"{gw}/readyz") for gw in stack.gateways]
                await asyncio.sleep(PAUSE_S / 2)
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            resumed_at = time.time()
            await asyncio.sleep(6)
            stop.set()
            await asyncio.wait_for(load, 120)
            # Readers catch up with everything acknowledged, then stop.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                len(readers[n].received) < len(producers[n].acked) for n in names
            ):
                await asyncio.sleep(0.1)
        finally:
            for task in reading:
                task.cancel()
            await asyncio.gather(*reading, return_exceptions=True)
            await sse_client.aclose()
        async with client() as http:
            stored = {name: await read_all(http, url[name]) for name in names}

        others = [n for n in names if n not in by_master[victim_port]]
        paused = by_master[victim_port]
        problems = check_exactly_once_in_order(
            [m for n in names for m in stored[n]], list(producers.values())
        )

        def acked_in(ns: list[str], lo: float, hi: float) -> int:
            return sum(1 for n in ns for t in producers[n].acked_at.values() if lo <= t <= hi)

        def worst_delivery_ms(ns: list[str], lo: float, hi: float) -> float:
            worst = 0.0
            for n in ns:
                for m, at in zip(readers[n].received, readers[n].received_at, strict=True):
                    acked = producers[n].acked_at.get(m["i"])
                    if acked is not None and lo <= acked <= hi:
                        worst = max(worst, at - acked)
            return worst * 1000

        reader_ok = {n: readers[n].received == stored[n] for n in names}
        print(f"  master {victim_port} SIGSTOPped {PAUSE_S:.0f} s ({len(paused)} streams on it, "
              f"{len(others)} on the other two masters)")  # fmt: skip
        print(f"  streams on the other masters: {acked_in(others, paused_at, resumed_at)} appends acknowledged "
              f"during the pause ({acked_in(others, paused_at - PAUSE_S, paused_at)} in the {PAUSE_S:.0f} s before); "
              f"{summarize([producers[n] for n in others])}; "
              f"worst delivery to their SSE readers during the pause "
              f"{worst_delivery_ms(others, paused_at, resumed_at):.0f} ms "
              f"(before: {worst_delivery_ms(others, paused_at - PAUSE_S, paused_at):.0f} ms)")  # fmt: skip
        print(f"  streams on the paused master: {acked_in(paused, paused_at, resumed_at)} appends acknowledged "
              f"during the pause; {summarize([producers[n] for n in paused])}")  # fmt: skip
        print(f"  streams hold {sum(len(v) for v in stored.values())} messages; problems: {problems}; "
              f"every SSE reader got its stream exactly, in order: {all(reader_ok.values())}")  # fmt: skip
        print(f"  scenario 4 took {time.monotonic() - started:.0f} s")
        print(f"  /readyz of the replicas during the pause: {[r.status_code for r in ready]}")
        assert [r.status_code for r in ready] == [200] * len(stack.gateways)
        assert all(r.json()["redis_nodes"][f"127.0.0.1:{victim_port}"] is False for r in ready)
        assert all(v == 0 for v in problems.values()), problems
        assert all(reader_ok.values()), [n for n, ok in reader_ok.items() if not ok]
        # Unaffected: not one failed request on the other masters' streams, and
        # they kept going during the pause.
        assert sum(producers[n].retries for n in others) == 0
        assert acked_in(others, paused_at, resumed_at) > 0
