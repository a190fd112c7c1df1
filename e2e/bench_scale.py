"""`make bench-scale`: check docs/scaling.md's cost model against the local stack.

    python -m e2e.bench_scale [--seconds 10] [--replicas 2] [--only scale,memory,reshard]
                              [--messages N] [--reshard-streams N]

**scale**: for 1 master (a single Redis 7) and then 3 (a Redis 7 cluster), in the same run:
REPLICAS gateway processes (`dsgw serve --workers 1` each), 64 streams, and one wrk per replica
appending ~100-byte JSON messages (e2e/bench/wrk_append.lua) for SECONDS after a warm-up. It
reads the CPU time of every gateway, Redis and wrk process over the window and prints, per
topology, the measured appends/s, the appends/s the cost model projects for this machine, and
their ratio. The projection (`project`) uses the CPU-us per append of `make bench`
(docs/performance.md) for the gateway and Redis, and this run's own wrk cost per request: on a
machine whose cores everything shares, throughput = cores x 1e6 / (gateway + Redis + client us
per append), capped by what the replica processes (one core each) and the masters (one core
each) can do alone.

**memory**: Redis bytes per stored message (used_memory per message of ~100 bytes, with the
sync feed's backlog and after the sink drained it) and Postgres bytes per message
(pg_total_relation_size of session_events, and of stream_history for tiered streams), on a
single Redis 7 and an embedded Postgres.

**reshard**: `dsgw reshard --to 1024` of N streams written with the legacy 16 shards: seconds per
million streams.

Run it on a quiet machine: everything shares the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e import stack as stack_module  # noqa: E402
from e2e.bench_compare import ensure_wrk, parse_wrk, process_tree  # noqa: E402
from gateway.embedded import start_postgres, start_redis  # noqa: E402

BENCH_DIR = ROOT / "e2e" / "bench"
# CPU-us per plain append of `make bench` (docs/performance.md, scenario g): the model's inputs.
GATEWAY_US_PER_APPEND = 206.0
REDIS_US_PER_APPEND = 68.0
STREAMS = 64
BODY_BYTES = 100


# --- the model -------------------------------------------------------------------------


@dataclass
class Projection:
    appends_per_s: float
    bound: str  # which resource limits it


def project(
    *, replicas: int, masters: int, cores: float, gateway_us: float, redis_us: float, client_us: float = 0.0
) -> Projection:
    """Appends/s that `replicas` one-process gateways on `masters` Redis masters sustain.

    Each gateway process and each Redis master uses at most one core; all of them (and the
    load generator, `client_us` per append) share `cores`."""
    limits = {
        "gateway processes": replicas * 1e6 / gateway_us,
        "redis masters": masters * 1e6 / redis_us,
        "machine cores": cores * 1e6 / (gateway_us + redis_us + client_us),
    }
    bound = min(limits, key=lambda k: limits[k])
    return Projection(limits[bound], bound)


# --- processes and CPU -----------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / tick


@dataclass
class Topology:
    masters: int
    redis_url: str = ""
    redis_pids: list[int] = field(default_factory=list)
    gateways: list[stack_module.Proc] = field(default_factory=list)
    own: stack_module.Stack = field(default_factory=stack_module.Stack)

    def stop(self) -> None:
        for proc in reversed(self.own.procs):  # only what this run started, by PID
            stack_module.stop_proc(proc)


def start_topology(masters: int, replicas: int, env: dict[str, str]) -> Topology:
    topo = Topology(masters)
    stack_module.STACK_DIR.mkdir(exist_ok=True)  # the processes' logs
    try:
        if masters == 1:
            server = start_redis(
                Path(tempfile.mkdtemp(prefix="dsgw-scale-redis-")),
                persistent=True,
                binary=stack_module.redis7_server(),
                detach=True,
            )
            topo.own.procs.append(stack_module.Proc("redis", server.proc.pid, f"{server.port}", server.port))
            topo.redis_url = f"redis://127.0.0.1:{server.port}/0"
        else:
            topo.redis_url = stack_module.start_redis_cluster(topo.own, masters=masters)
        topo.own.redis_url = topo.redis_url
        topo.redis_pids = [p.pid for p in topo.own.procs if p.role == "redis"]
        for _ in range(replicas):
            proc = stack_module.start_gateway_replica(topo.own, {"DSGW_LOG_LEVEL": "WARNING", **env})
            topo.own.procs.append(proc)
            topo.gateways.append(proc)
        for proc in topo.gateways:
            stack_module.wait_ready(f"http://127.0.0.1:{proc.port}/readyz")
    except BaseException:
        topo.stop()
        raise
    return topo


def put(url: str, content_type: str = "application/json", body: bytes | None = None) -> None:
    request = urllib.request.Request(url, data=body, method="PUT", headers={"content-type": content_type})
    urllib.request.urlopen(request, timeout=10).close()


# --- scale -----------------------------------------------------------------------------


def run_wrks(bases: list[str], prefix: str, seconds: float) -> tuple[list[str], float]:
    """One wrk per replica, at once, 64 connections split over them; their output and CPU."""
    wrk = ensure_wrk()
    per = max(1, 64 // len(bases))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    running = [
        subprocess.Popen(
            [
                wrk,
                "-t1",
                f"-c{per}",
                f"-d{max(1, round(seconds))}s",
                "-s",
                "wrk_append.lua",
                base,
                "--",
                prefix,
                str(STREAMS),
                str(BODY_BYTES),
            ],
            cwd=BENCH_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for base in bases
    ]
    outputs = [p.communicate(timeout=seconds + 60)[0] for p in running]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return outputs, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def measure_scale(masters: int, replicas: int, seconds: float) -> dict:
    topo = start_topology(masters, replicas, {})
    try:
        bases = [f"http://127.0.0.1:{g.port}" for g in topo.gateways]
        prefix = f"scale{masters}-{int(time.time())}"
        for i in range(STREAMS):
            put(f"{bases[0]}/v1/stream/{prefix}-{i}")
        run_wrks(bases, prefix, 2)  # warm-up
        gateway_pids = [pid for g in topo.gateways for pid in process_tree(g.pid)]
        gw0, redis0 = cpu_seconds(gateway_pids), cpu_seconds(topo.redis_pids)
        outputs, client_cpu = run_wrks(bases, prefix, seconds)
        gw_cpu, redis_cpu = cpu_seconds(gateway_pids) - gw0, cpu_seconds(topo.redis_pids) - redis0
    finally:
        topo.stop()
    results = [parse_wrk(out) for out in outputs]
    appends = sum(r["requests"] for r in results)
    rate = sum(r["perSecond"] for r in results)
    failures = sum(r["non2xx"] + r["socketErrors"] for r in results)
    client_us = client_cpu / appends * 1e6
    cores = float(os.cpu_count() or 1)
    projected = project(
        replicas=replicas, masters=masters, cores=cores,
        gateway_us=GATEWAY_US_PER_APPEND, redis_us=REDIS_US_PER_APPEND, client_us=client_us,
    )  # fmt: skip
    return {
        "masters": masters,
        "replicas": replicas,
        "appends_per_s": rate,
        "failures": failures,
        "projected_per_s": projected.appends_per_s,
        "bound": projected.bound,
        "ratio": rate / projected.appends_per_s,
        "measured_us_per_append": {
            "gateway": gw_cpu / appends * 1e6,
            "redis": redis_cpu / appends * 1e6,
            "wrk": client_us,
        },
        "load_before": os.getloadavg()[0],
    }


# --- memory ----------------------------------------------------------------------------


def used_memory(r) -> int:  # type: ignore[no-untyped-def]
    return int(r.info("memory")["used_memory"])


async def append_messages(base: str, prefix: str, streams: int, messages: int, per_append: int = 100) -> None:
    import httpx

    pad = "x" * (BODY_BYTES - len('{"type":"m","n":"000000","pad":""}'))
    body = (
        "[" + ",".join(f'{{"type":"m","n":"{i:06d}","pad":"{pad}"}}' for i in range(per_append)) + "]"
    ).encode()
    appends = messages // per_append
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for i in range(streams):
            await client.put(f"/v1/stream/{prefix}/{i}", headers={"content-type": "application/json"})

        async def one(n: int) -> None:
            async with limit:
                r = await client.post(
                    f"/v1/stream/{prefix}/{n % streams}",
                    headers={"content-type": "application/json"},
                    content=body,
                )
                assert r.status_code == 204, r.text

        await asyncio.gather(*(one(n) for n in range(appends)))


def wait_for(predicate, what: str, timeout_s: float = 600):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)
    return value


def rel_size(database_url: str, table: str) -> tuple[int, int]:
    """pg_total_relation_size and rows of `table`."""
    import asyncpg

    async def query() -> tuple[int, int]:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                f"SELECT pg_total_relation_size('{table}') AS size, count(*) AS n FROM {table}"
            )
            return int(row["size"]), int(row["n"])
        finally:
            await conn.close()

    return asyncio.run(query())


def start_sink(env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "gateway.cli", "worker", "sink"]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_memory(messages: int) -> dict:
    import redis

    from gateway.keys import SHARDS, feed_key

    base_dir = Path(tempfile.mkdtemp(prefix="dsgw-scale-mem-"))
    base_dir.chmod(0o711)
    pg = start_postgres(base_dir / "pg", durable=False, log_file=base_dir / "postgres.log")
    topo = start_topology(1, 1, {"DATABASE_URL": pg.url})
    workers: list[subprocess.Popen] = []
    try:
        r = redis.Redis.from_url(topo.redis_url)
        base = f"http://127.0.0.1:{topo.gateways[0].port}"
        env = {**os.environ, "REDIS_URL": topo.redis_url, "DATABASE_URL": pg.url, "DSGW_LOG_LEVEL": "WARNING"}
        subprocess.run(
            [sys.executable, "-m", "gateway.cli", "migrate"], env=env, check=True, capture_output=True
        )
        events0 = rel_size(pg.url, "session_events")
        mem0 = used_memory(r)
        asyncio.run(append_messages(base, "mem", 1000, messages))
        mem_backlog = used_memory(r)
        workers.append(start_sink(env))
        wait_for(lambda: rel_size(pg.url, "session_events")[1] - events0[1] >= messages, "the sink to drain")
        wait_for(lambda: sum(r.xlen(feed_key(s)) for s in range(SHARDS)) == 0, "the feeds to be trimmed")
        mem_drained = used_memory(r)
        events1 = rel_size(pg.url, "session_events")
        history = measure_history(env, topo, pg.url, workers, max(10_000, messages // 5))
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(30)
        topo.stop()
        pg.stop()
        shutil.rmtree(base_dir, ignore_errors=True)
    rows = events1[1] - events0[1]
    return {
        "messages": messages,
        "redis_bytes_per_message_with_feed_backlog": (mem_backlog - mem0) / messages,
        "redis_bytes_per_message": (mem_drained - mem0) / messages,
        "session_events_bytes_per_row": (events1[0] - events0[0]) / rows,
        **history,
    }


def measure_history(
    env: dict[str, str], topo: Topology, database_url: str, workers: list, messages: int
) -> dict:
    """A tiered gateway and sink (DSGW_RETAIN_MESSAGES=100): stream_history bytes per row."""
    tiered = {"DSGW_RETAIN_MESSAGES": "100"}
    gateway = stack_module.start_gateway_replica(topo.own, {"DSGW_LOG_LEVEL": "WARNING", **tiered})
    topo.own.procs.append(gateway)
    stack_module.wait_ready(f"http://127.0.0.1:{gateway.port}/readyz")
    workers[0].terminate()
    workers[0].wait(30)
    workers.append(start_sink({**env, **tiered}))
    before = rel_size(database_url, "stream_history")
    asyncio.run(append_messages(f"http://127.0.0.1:{gateway.port}", "tiered", 100, messages))
    wait_for(
        lambda: rel_size(database_url, "stream_history")[1] - before[1] >= messages, "stream_history rows"
    )
    after = rel_size(database_url, "stream_history")
    return {
        "history_messages": messages,
        "stream_history_bytes_per_row": (after[0] - before[0]) / (after[1] - before[1]),
    }


def measure_reshard(streams: int) -> dict:
    """`dsgw reshard --to 1024` of `streams` streams written with the legacy 16 shards (each with
    10 JSON messages and a producer): seconds, hence seconds per million streams."""
    topo = start_topology(1, 1, {"DSGW_SHARDS": "16", "DSGW_SINK_STREAMS": "-"})
    try:
        base = f"http://127.0.0.1:{topo.gateways[0].port}"
        asyncio.run(write_reshard_streams(base, streams))
        stack_module.stop_proc(topo.gateways[0])
        env = {**os.environ, "REDIS_URL": topo.redis_url}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "reshard", "--to", "1024"], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        seconds = time.monotonic() - started
    finally:
        topo.stop()
    return {"streams": streams, "seconds": seconds, "seconds_per_million_streams": seconds / streams * 1e6,
            "output": done.stdout.strip().splitlines()[-1]}  # fmt: skip


async def write_reshard_streams(base: str, streams: int) -> None:
    import httpx

    limit = asyncio.Semaphore(16)
    body = b"[" + b",".join(b'{"type":"m","n":%d}' % i for i in range(10)) + b"]"
    producer = {
        "content-type": "application/json",
        "producer-id": "p",
        "producer-epoch": "0",
        "producer-seq": "0",
    }
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def one(i: int) -> None:
            async with limit:
                await client.put(f"/v1/stream/reshard/{i}", headers={"content-type": "application/json"})
                assert (
                    await client.post(f"/v1/stream/reshard/{i}", headers=producer, content=body)
                ).is_success

        await asyncio.gather(*(one(i) for i in range(streams)))


# --- output ----------------------------------------------------------------------------


def print_scale(rows: list[dict]) -> None:
    print(f"\n{'masters':>7} {'replicas':>8} {'measured/s':>11} {'projected/s':>12} {'ratio':>6}  bound"
          "             us/append: gateway  redis  wrk")  # fmt: skip
    for row in rows:
        us = row["measured_us_per_append"]
        print(f"{row['masters']:>7} {row['replicas']:>8} {row['appends_per_s']:>11,.0f} {row['projected_per_s']:>12,.0f}"
              f" {row['ratio']:>6.2f}  {row['bound']:<18} {us['gateway']:>16.0f} {us['redis']:>6.0f} {us['wrk']:>4.0f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--only", default="scale,memory,reshard")
    parser.add_argument("--reshard-streams", type=int, default=5000, help="streams of the reshard timing")
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages of the memory measurement")
    args = parser.parse_args()
    only = set(args.only.split(","))
    report: dict = {"load_before": os.getloadavg(), "cores": os.cpu_count()}
    if "scale" in only:
        report["scale"] = [measure_scale(m, args.replicas, args.seconds) for m in (1, 3)]
        print_scale(report["scale"])
    if "reshard" in only:
        report["reshard"] = measure_reshard(args.reshard_streams)
        print(json.dumps(report["reshard"], indent=2))
    if "memory" in only:
        report["memory"] = measure_memory(args.messages)
        print(json.dumps(report["memory"], indent=2))
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}")
    out = ROOT / ".bench" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"raw numbers: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
