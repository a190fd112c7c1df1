"""Append throughput: ds-gateway (one process, one Redis) against the official
in-memory reference server (npm @durable-streams/server), same machine, same
load generator (autocannon), same run.

    python -m e2e.bench_append [--seconds 10] [--connections 32] [--workers 1]

Each side gets --connections concurrent clients POSTing a small JSON message
to one stream for --seconds after a 2 s warm-up; prints appends/s for both and
the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

E2E_DIR = Path(__file__).resolve().parent
BENCH_DIR = E2E_DIR / "bench"  # npm tools for benchmarks only (e2e/bench/package.json)
ROOT = E2E_DIR.parent
sys.path.insert(0, str(ROOT))

from gateway.embedded import free_port, start_redis, stop_child, wait_for_port  # noqa: E402

BODY = '{"type":"chat","key":"m","text":"hello"}'


def ensure_bench_tools() -> None:
    # `npm install`, not `npm ci`: the reference server pulls in optional
    # per-platform packages that npm leaves out of the lockfile.
    if not (BENCH_DIR / "node_modules" / "autocannon").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH_DIR, check=True
        )


def load(url: str, seconds: int, connections: int) -> dict:
    args = [
        "npx", "--no-install", "autocannon", "--json", "-c", str(connections), "-d", str(seconds),
        "-m", "POST", "-H", "content-type=application/json", "-b", BODY, url,
    ]  # fmt: skip
    out = subprocess.run(args, cwd=BENCH_DIR, capture_output=True, text=True, timeout=seconds + 60).stdout
    return json.loads(out)


def measure(base_url: str, args: argparse.Namespace) -> tuple[float, int]:
    url = f"{base_url}/v1/stream/bench-{time.time_ns()}"
    created = httpx.put(url, headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    load(url, 2, args.connections)  # warm-up
    result = load(url, args.seconds, args.connections)
    return result["requests"]["average"], result["non2xx"] + result["errors"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes")
    args = parser.parse_args()
    ensure_bench_tools()

    port = free_port()
    reference = subprocess.Popen(
        ["node", "reference_server.mjs", str(port)], cwd=BENCH_DIR, stdout=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, proc=reference)
        ref_rate, ref_bad = measure(f"http://127.0.0.1:{port}", args)
    finally:
        stop_child(reference)

    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp), persistent=False)
        gw_port = free_port()
        serve = ["serve", "--port", str(gw_port), "--workers", str(args.workers)]
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *serve],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": redis.url, "DSGW_LOG_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(gw_port, proc=gateway)
            time.sleep(0.5)
            ours, our_bad = measure(f"http://127.0.0.1:{gw_port}", args)
        finally:
            stop_child(gateway)
            redis.stop()

    print(f"reference server (in memory): {ref_rate:,.0f} appends/s ({ref_bad} failed)")
    print(f"ds-gateway, {args.workers} process(es) + Redis: {ours:,.0f} appends/s ({our_bad} failed)")
    print(f"ratio ds-gateway / reference: {ours / ref_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
