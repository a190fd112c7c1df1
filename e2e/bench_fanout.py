"""Live delivery latency, same replica vs across replicas.

    python -m e2e.bench_fanout [--rounds 300]     # brings up its own stack

A long-poll reader waits on replica A; a writer appends through A (same
replica) or through B (cross replica); latency = from sending the POST to the
reader holding the message. Both are measured the same way, in the same run,
alternating, so the ratio is what matters.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def one_round(client: httpx.AsyncClient, reader_base: str, writer_base: str, name: str, offset: str):
    url = f"{reader_base}/v1/stream/{name}"
    poll = asyncio.create_task(client.get(url, params={"offset": offset, "live": "long-poll"}))
    await asyncio.sleep(0.01)  # let the reader start waiting
    sent = time.perf_counter()
    await client.post(f"{writer_base}/v1/stream/{name}", headers={"content-type": "text/plain"}, content=b"x")
    response = await poll
    received = time.perf_counter()
    if response.status_code != 200 or response.content != b"x":
        raise RuntimeError(f"reader got {response.status_code} {response.content!r}")
    return (received - sent) * 1000, response.headers["stream-next-offset"]


async def measure(gateways: list[str], rounds: int) -> dict[str, list[float]]:
    a, b = gateways[0], gateways[1]
    results: dict[str, list[float]] = {"same replica": [], "cross replica": []}
    async with httpx.AsyncClient(timeout=30) as client:
        name = f"bench-fanout-{time.time_ns()}"
        created = await client.put(f"{a}/v1/stream/{name}", headers={"content-type": "text/plain"})
        offset = created.headers["stream-next-offset"]
        for i in range(rounds):
            for label, writer in (("same replica", a), ("cross replica", b)) if i % 2 else (
                ("cross replica", b), ("same replica", a)):  # fmt: skip
                latency, offset = await one_round(client, a, writer, name, offset)
                results[label].append(latency)
    return results


def report(results: dict[str, list[float]]) -> str:
    lines = []
    for label, values in results.items():
        lines.append(
            f"{label:>13}: p50 {pct(values, 50):.2f} ms  p99 {pct(values, 99):.2f} ms  (n={len(values)})"
        )
    ratio = pct(results["cross replica"], 50) / pct(results["same replica"], 50)
    lines.append(f"ratio cross / same (p50): {ratio:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    from e2e import stack as stack_module

    running = stack_module.up(redis_mode="cluster", replicas=3, env={"DSGW_LONG_POLL_TIMEOUT_MS": "5000"})
    try:
        print(report(asyncio.run(measure(running.gateways, args.rounds))))
    finally:
        stack_module.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
