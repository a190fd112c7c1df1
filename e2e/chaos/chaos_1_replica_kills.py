"""Scenario 1: 64 idempotent producers (8 of them the official TypeScript
client's IdempotentProducer) append through the balancer while one replica is
SIGKILLed and restarted, twice. Every acknowledged append is in its stream
exactly once, in its producer's order."""

from __future__ import annotations

import asyncio
import json
import time

from e2e import stack as stack_module
from e2e.chaos.tools import (
    JSON,
    ROOT,
    Producer,
    check_exactly_once_in_order,
    client,
    new_name,
    read_all,
    running_stack,
    summarize,
    until,
)

STREAMS = 8
PY_PER_STREAM = 7  # + 1 TypeScript producer per stream: 64 producers
COUNT = 300  # appends per producer
PAUSE_S = 0.03


async def test_replica_sigkilled_twice_under_64_idempotent_producers():
    started = time.monotonic()
    with running_stack() as stack:
        urls = [f"{stack.base_url}/v1/stream/{new_name(f'producers-{k}')}" for k in range(STREAMS)]
        async with client(connections=PY_PER_STREAM * STREAMS + 8) as http:
            for url in urls:
                assert (await http.put(url, headers=JSON)).status_code == 201
            producers = [
                Producer(f"py-{k}-{j}", url) for k, url in enumerate(urls) for j in range(PY_PER_STREAM)
            ]
            spec = {
                "producers": [{"url": url, "id": f"ts-{k}"} for k, url in enumerate(urls)],
                "count": COUNT,
                "pauseMs": int(PAUSE_S * 1000),
            }
            node = await asyncio.create_subprocess_exec(
                "node", str(ROOT / "e2e/chaos/ts_producers.mjs"), json.dumps(spec),
                cwd=ROOT / "e2e", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            load = asyncio.gather(*(p.run(COUNT, PAUSE_S) for p in producers))
            total = COUNT * len(producers)
            victim = stack.find("gateway")[0]
            kills = []
            for fraction in (0.25, 0.6):
                assert await until(lambda f=fraction: sum(len(p.acked) for p in producers) >= f * total, 120)
                acked_before = sum(len(p.acked) for p in producers)
                victim = await asyncio.to_thread(stack_module.restart, stack, victim, down_s=0.5)
                kills.append(acked_before)
            await asyncio.wait_for(load, 300)
            out, err = await asyncio.wait_for(node.communicate(), 300)
            assert node.returncode == 0, err.decode()
            ts = json.loads(out.decode().strip().splitlines()[-1])

            messages = [m for url in urls for m in await read_all(http, url)]
        ts_producers = [Producer(p["id"], "") for p in ts["producers"]]
        for tp, result in zip(ts_producers, ts["producers"], strict=True):
            tp.acked = list(range(result["acked"])) if result["acked"] >= 0 else []
            tp.refused = [(-1, 0, e) for e in result["errors"]]
        problems = check_exactly_once_in_order(messages, producers + ts_producers)

        print(
            f"  replica {victim.port} SIGKILLed and restarted after {kills[0]} and {kills[1]} acknowledged appends"
        )
        print(f"  Python producers ({len(producers)}): {summarize(producers)}")
        print(f"  TypeScript IdempotentProducer ({len(ts_producers)}): "
              f"{sum(len(p.acked) for p in ts_producers)} appends acknowledged (flush resolved), "
              f"requests retried with the same seq: {ts['retries'] or 'none'}, "
              f"errors: {sum(len(p['errors']) for p in ts['producers'])}")  # fmt: skip
        print(f"  streams hold {len(messages)} messages; expected {COUNT * 64}; problems: {problems}")
        print(f"  scenario 1 took {time.monotonic() - started:.0f} s")
        assert all(v == 0 for v in problems.values()), problems
        assert len(messages) == COUNT * 64
