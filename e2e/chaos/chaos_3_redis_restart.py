"""Scenario 3: Redis SIGKILLed and restarted under load, once with
`appendfsync always` and once with `everysec`. Every acknowledged append must
survive the crash of the Redis process in both modes (the AOF is written
before the reply; the page cache holds it). What `everysec` risks is a host
crash (power loss): what the kernel had not written to disk yet. That window
is measured by tracing Redis's fsyncs under the same load (strace)."""

from __future__ import annotations

import asyncio
import bisect
import re
import shutil
import signal
import subprocess
import time

import pytest

from e2e import stack as stack_module
from e2e.chaos.tools import (
    JSON,
    Producer,
    check_exactly_once_in_order,
    client,
    new_name,
    read_all,
    running_stack,
    summarize,
)

STREAMS = 4
PRODUCERS_PER_STREAM = 4
PAUSE_S = 0.01
TRACE_S = 4.0


def trace_fsyncs(pid: int, seconds: float) -> list[float]:
    """Times (epoch seconds) of Redis's fsync/fdatasync calls, any thread, for
    `seconds`. seccomp-bpf stops Redis only on those calls, not on every one."""
    out = subprocess.run(
        ["timeout", "-s", "INT", str(seconds), "strace", "-f", "--seccomp-bpf", "-ttt", "-qq",
         "-e", "trace=fsync,fdatasync", "-p", str(pid)],
        capture_output=True, text=True,
    )  # fmt: skip
    # "[pid 123] 1764393600.123456 fdatasync(7 <unfinished ...>" or "... fdatasync(7) = 0"
    return [float(m.group(1)) for m in re.finditer(r"(\d+\.\d+) f(?:data)?sync\(", out.stderr)]


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_redis_sigkilled_and_restarted_under_load(fsync: str):
    started = time.monotonic()
    with running_stack(redis_args=["--appendfsync", fsync]) as stack:
        urls = [f"{stack.base_url}/v1/stream/{new_name(f'redis-{fsync}-{k}')}" for k in range(STREAMS)]
        async with client() as http:
            for url in urls:
                assert (await http.put(url, headers=JSON)).status_code == 201
        producers = [
            Producer(f"p-{k}-{j}", url) for k, url in enumerate(urls) for j in range(PRODUCERS_PER_STREAM)
        ]
        stop = asyncio.Event()
        load = asyncio.gather(*(p.run(1_000_000, PAUSE_S, stop) for p in producers))
        await asyncio.sleep(2)

        window = ""
        if fsync == "everysec" and shutil.which("strace"):
            redis_pid = stack.find("redis")[0].pid
            fsyncs = await asyncio.to_thread(trace_fsyncs, redis_pid, TRACE_S)
            acks = sorted(t for p in producers for t in p.acked_at.values())
            gaps = [
                (b - a, bisect.bisect_right(acks, b) - bisect.bisect_right(acks, a))
                for a, b in zip(fsyncs, fsyncs[1:], strict=False)
            ]
            if gaps:
                worst_gap = max(g for g, _ in gaps)
                worst_acks = max(n for _, n in gaps)
                window = (f"everysec: {len(fsyncs)} fsyncs in {TRACE_S:.0f} s under load, at most {worst_gap * 1000:.0f} ms "
                          f"and {worst_acks} acknowledged appends between two: what a host crash could lose")  # fmt: skip

        acked_before = sum(len(p.acked) for p in producers)
        redis_proc = stack.find("redis")[0]
        down = time.monotonic()
        await asyncio.to_thread(stack_module.restart, stack, redis_proc, signal.SIGKILL, 1.0)
        down_s = time.monotonic() - down
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(load, 120)
        async with client() as http:
            messages = [m for url in urls for m in await read_all(http, url)]
        problems = check_exactly_once_in_order(messages, producers)

        print(f"  appendfsync {fsync}: Redis SIGKILLed after {acked_before} acknowledged appends, "
              f"restarted {down_s:.1f} s later on its AOF")  # fmt: skip
        print(f"  producers: {summarize(producers)}")
        print(f"  streams hold {len(messages)} messages; problems: {problems}")
        if window:
            print(f"  {window}")
        print(f"  scenario 3 ({fsync}) took {time.monotonic() - started:.0f} s")
        assert all(v == 0 for v in problems.values()), problems
