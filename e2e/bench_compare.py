"""`make bench`: ds-gateway side by side with the reference server, in one run,
driven by the same load generator (e2e/bench/loadgen.mjs).

    python -m e2e.bench_compare [--quick] [--only a,b,c,d,e,f,wrk] [--seconds S] [--no-wrk]

Starts the official in-memory reference server (npm @durable-streams/server,
long-poll timeout 500 ms) and ds-gateway as a user runs it in production on
this machine (`dsgw serve --workers <cores>` on a Redis 7 with appendonly yes,
appendfsync everysec), runs every scenario against the reference and then
against ds-gateway, prints one table (ours, reference, ratio, target,
PASS/MISS) and writes every number to .bench/results-<time>.json. The
scenarios and the CPU accounting are described in docs/performance.md.

Exit status: non-zero only when the harness itself failed (a process would not
start, the load generator crashed), never for a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
BENCH_DIR = E2E_DIR / "bench"  # npm tools for benchmarks only (e2e/bench/package.json)
ROOT = E2E_DIR.parent
sys.path.insert(0, str(ROOT))

from redis.exceptions import RedisError  # noqa: E402

from e2e import bench_report  # noqa: E402
from e2e.apt import debian_binary  # noqa: E402
from e2e.stack import redis7_server, wait_ready  # noqa: E402
from gateway.embedded import (  # noqa: E402
    EmbeddedError,
    die_with_parent,
    free_port,
    start_redis,
    stop_child,
    wait_for_port,
)

REFERENCE_LONG_POLL_MS = 500
WRITERS = 64
BODY_BYTES = 100
ALL_SCENARIOS = ["a", "b", "c", "d", "e", "f", "wrk"]


class HarnessError(RuntimeError):
    pass


@dataclass
class Plan:
    """Sizes of one run: the full run (~5 minutes), --quick, or --smoke (the harness's own test)."""

    seconds: float
    warmup_s: float
    writers: int
    catchup: list[tuple[int, int]]  # (messages, reads)
    fanout: tuple[int, int, int]  # subscribers, messages, appends/s
    longpoll_rounds: int
    # label, streams, subscribers per stream, messages per stream, appends/s, "all served" target (ms)
    scale: list[tuple[str, int, int, int, int, float | None]] = field(default_factory=list)


FULL = Plan(
    seconds=10,
    warmup_s=2,
    writers=WRITERS,
    catchup=[(10_000, 5), (100_000, 3)],
    fanout=(200, 200, 100),
    longpoll_rounds=200,
    scale=[
        ("1000 subs / 1 stream", 1, 1000, 100, 20, 150.0),
        ("2000 subs / 1 stream", 1, 2000, 100, 20, None),
        ("1000 subs / 100 streams", 100, 10, 10, 100, None),
    ],
)
QUICK = Plan(
    seconds=3,
    warmup_s=1,
    writers=WRITERS,
    catchup=[(10_000, 3), (100_000, 2)],
    fanout=(200, 100, 100),
    longpoll_rounds=50,
    scale=[
        ("1000 subs / 1 stream", 1, 1000, 40, 20, 150.0),
        ("2000 subs / 1 stream", 1, 2000, 40, 20, None),
        ("1000 subs / 100 streams", 100, 10, 4, 100, None),
    ],
)
SMOKE = Plan(
    seconds=1,
    warmup_s=0.5,
    writers=4,
    catchup=[(2_000, 2)],
    fanout=(10, 20, 50),
    longpoll_rounds=5,
    scale=[("20 subs / 1 stream", 1, 20, 10, 50, 150.0), ("20 subs / 4 streams", 4, 5, 5, 50, None)],
)


# --- processes -----------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from the parent PIDs in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@dataclass
class Server:
    """A server under test: its URL and the processes whose CPU it costs."""

    name: str
    base: str
    pids: list[int]
    redis_pid: int | None = None
    redis_port: int | None = None
    proc: subprocess.Popen | None = None

    def cpu_config(self) -> dict:
        groups = {"server": self.pids}
        if self.redis_pid:
            groups["redis"] = [self.redis_pid]
        return {"clkTck": os.sysconf("SC_CLK_TCK"), "groups": groups, "redisPort": self.redis_port}


class Processes:
    """Everything the harness starts, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def spawn(self, args: list[str], **kwargs) -> subprocess.Popen:
        # die_with_parent: a harness killed with SIGKILL leaves no server behind.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        children = {pid: cmdline(pid) for pid in process_tree(proc.pid)[1:]} if proc.poll() is None else {}
        stop_child(proc)
        for pid, command in children.items():  # children the parent failed to stop (uvicorn workers)
            if command and cmdline(pid) == command:  # still that process, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def ensure_bench_tools() -> None:
    """npm install in e2e/bench when node_modules is missing or older than package.json."""
    stamp = BENCH_DIR / "node_modules" / ".installed-stamp"
    manifests = [BENCH_DIR / "package.json", BENCH_DIR / "package-lock.json"]
    if stamp.exists() and all(stamp.stat().st_mtime >= m.stat().st_mtime for m in manifests):
        return
    # `npm install`, not `npm ci`: the reference server pulls in optional
    # per-platform packages that npm leaves out of the lockfile on other platforms.
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=BENCH_DIR,
        check=True,
        timeout=600,
    )
    stamp.touch()


def start_reference(procs: Processes) -> Server:
    port = free_port()
    proc = procs.spawn(
        ["node", "reference_server.mjs", str(port), str(REFERENCE_LONG_POLL_MS)],
        cwd=BENCH_DIR,
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return Server("reference", f"http://127.0.0.1:{port}", [proc.pid], proc=proc)


def start_gateway(procs: Processes, redis_url: str, workers: int, log: Path) -> Server:
    port = free_port()
    proc = procs.spawn(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "DSGW_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/readyz")
    # With several workers /readyz answers as soon as one is up; wait for all of them.
    deadline = time.monotonic() + 30
    while len(process_tree(proc.pid)) < 1 + (workers if workers > 1 else 0):
        if time.monotonic() > deadline:
            raise HarnessError(
                f"gateway has {len(process_tree(proc.pid))} processes, expected {workers} workers"
            )
        time.sleep(0.1)
    for _ in range(4 * workers):  # every worker's /readyz (the kernel spreads connections)
        wait_ready(f"{base}/readyz")
    return Server(f"ds-gateway x{workers}", base, process_tree(proc.pid), proc=proc)


# --- load generator and wrk -------------------------------------------------------------


# Headers every generated request carries: a bearer token with --auth (sent to
# the reference too, which ignores it, so the generator does the same work).
EXTRA_HEADERS: dict[str, str] = {}


def enable_auth() -> None:
    """--auth: the gateway verifies an HS256 token on every stream request."""
    import secrets

    import jwt

    secret = secrets.token_hex(32)
    os.environ["DSGW_AUTH_JWT_SECRET"] = secret  # start_gateway passes the environment on
    claims = {
        "exp": int(time.time()) + 6 * 3600,
        "sub": "bench",
        "ds": {op: ["**"] for op in ("read", "append", "manage")},
    }
    EXTRA_HEADERS["authorization"] = "Bearer " + jwt.encode(claims, secret, algorithm="HS256")


def run_loadgen(server: Server, scenario: str, *, deadline_s: float, **params) -> dict:
    config = {
        "scenario": scenario,
        "base": server.base,
        "hardDeadlineS": deadline_s,
        "cpu": server.cpu_config(),
        "headers": EXTRA_HEADERS,
    }
    config.update(params)
    with tempfile.TemporaryDirectory(prefix="dsgw-bench-") as tmp:
        config_path, result_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(config))
        done = subprocess.run(
            ["node", "loadgen.mjs", str(config_path), str(result_path)],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=deadline_s + 30,
        )
        if done.returncode != 0 or not result_path.exists():
            raise HarnessError(
                f"loadgen {scenario} on {server.name} exited {done.returncode}: {done.stderr[-2000:]}"
            )
        result = json.loads(result_path.read_text())
        if done.stderr.strip():  # e.g. retried reads: kept with the numbers they may explain
            result["stderr"] = done.stderr[-5000:]
        return result


def ensure_wrk() -> str:
    found = debian_binary("wrk", "wrk")
    if not found:
        raise HarnessError("wrk could not be installed with apt-get")
    return found


def parse_wrk(output: str) -> dict:
    """Requests/sec, requests, and failures from wrk's summary."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if not rate or not total:
        raise HarnessError(f"cannot read wrk's output: {output[-500:]}")
    return {
        "perSecond": float(rate.group(1)),
        "requests": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socketErrors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
    }


def run_wrk(server: Server, plan: Plan) -> dict:
    """One wrk run of scenario (a)'s shape: 64 connections, round-robin over 64 fresh streams,
    a warm-up, then the measured window."""
    wrk = ensure_wrk()
    prefix = unique("wrk")
    for w in range(plan.writers):
        request = urllib.request.Request(
            f"{server.base}/v1/stream/{prefix}-{w}",
            method="PUT",
            headers={"content-type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    def wrk_run(seconds: float) -> tuple[str, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        args = [wrk, "-t1", f"-c{plan.writers}", f"-d{max(1, round(seconds))}s", "-s", "wrk_append.lua",
                server.base, "--", prefix, str(plan.writers), str(BODY_BYTES)]  # fmt: skip
        done = subprocess.run(args, cwd=BENCH_DIR, capture_output=True, text=True, timeout=seconds + 30)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        return done.stdout + done.stderr, cpu

    wrk_run(plan.warmup_s)
    output, cpu_s = wrk_run(plan.seconds)
    result = parse_wrk(output)
    result["cpu"] = {"loadgenCpuS": cpu_s, "seconds": plan.seconds}
    result["output"] = output
    return result


def cross_check(server: Server, plan: Plan, append_params: dict) -> dict:
    """wrk and the load generator on the same server, interleaved (ours, wrk, wrk, ours) so
    that a drift in the machine's load hits both alike; the means are compared."""
    ours, wrk = [], []
    for turn in ("ours", "wrk", "wrk", "ours"):
        if turn == "wrk":
            wrk.append(run_wrk(server, plan))
        else:
            ours.append(run_loadgen(server, "append", **{**append_params, "prefix": unique("check")}))
    return {
        "perSecond": sum(r["perSecond"] for r in wrk) / len(wrk),
        "loadgenPerSecond": sum(r["perSecond"] for r in ours) / len(ours),
        "non2xx": sum(r["non2xx"] for r in wrk),
        "socketErrors": sum(r["socketErrors"] for r in wrk),
        "loadgenFailed": sum(
            n for r in ours for status, n in r["statuses"].items() if not status.startswith("2")
        ),
        "wrkRuns": wrk,
        "loadgenRuns": ours,
    }


# --- scenarios -----------------------------------------------------------------------


def unique(name: str) -> str:
    return f"bench-{name}-{time.time_ns()}"


def compact_aof(port: int, timeout_s: float = 120) -> int:
    """Rewrite the AOF now and wait for the rewrite to end; returns Redis's
    count of rewrites. Redis starts one by itself when the AOF reaches 64 MB
    and at every doubling after: without this, that rewrite (a fork writing the
    whole dataset, on the same 2 cores as both servers) falls inside whichever
    scenario's window crosses the threshold, and only there."""
    import redis

    client = redis.Redis(port=port, socket_timeout=10)
    deadline = time.monotonic() + timeout_s

    def persistence() -> dict:
        if time.monotonic() > deadline:
            raise HarnessError("the AOF rewrite between scenarios did not end in time")
        return client.info("persistence")

    try:
        while (info := persistence())["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]:
            time.sleep(0.1)
        client.bgrewriteaof()
        while (now := persistence())["aof_rewrites"] == info["aof_rewrites"] or now[
            "aof_rewrite_in_progress"
        ]:
            time.sleep(0.1)
        return int(now["aof_rewrites"])
    finally:
        client.close()


def aof_rewrites(port: int) -> int:
    import redis

    with redis.Redis(port=port, socket_timeout=10) as client:
        return int(client.info("persistence")["aof_rewrites"])


def both(servers: list[Server], scenario: str, *, deadline_s: float, **params) -> dict:
    """The same load on each server, reference first, each on fresh streams."""
    out = {}
    for server in servers:
        names = {k: unique(v) for k, v in params.items() if k in ("prefix", "name")}
        key = "reference" if server.name == "reference" else "ours"
        out[key] = run_loadgen(server, scenario, deadline_s=deadline_s, **{**params, **names})
        print(f"  {key}: done", flush=True)
    return out


def run_scenarios(
    args: argparse.Namespace,
    plan: Plan,
    procs: Processes,
    tmp: Path,
    results: dict,
    setup: dict,
    errors: list[str],
    warnings: list[str],
) -> None:
    """Start the servers, run the selected scenarios into `results`; a scenario
    that fails is recorded in `errors` and the others still run; a server
    process that dies is recorded in `warnings`."""
    only = set(args.only)
    reference = start_reference(procs)
    redis_binary = redis7_server()
    redis = start_redis(tmp / "redis", persistent=True, binary=redis_binary)  # appendonly yes, everysec
    procs.started.append(redis.proc)
    redis_version = subprocess.run([redis_binary, "--version"], capture_output=True, text=True).stdout.strip()
    gateway = start_gateway(procs, redis.url, args.gateway_workers, args.logs / "gateway.log")
    gateway.redis_pid, gateway.redis_port = redis.proc.pid, redis.port
    setup.update(
        reference=f"@durable-streams/server (e2e/bench/package.json), in memory, long-poll {REFERENCE_LONG_POLL_MS} ms",
        gateway=f"dsgw serve --workers {args.gateway_workers}",
        redis=f"{redis_version}; appendonly yes, appendfsync everysec",
        # Settings are the defaults unless the environment says otherwise: record what it said.
        gateway_env={k: v for k, v in os.environ.items() if k.startswith("DSGW_")},
    )
    servers = [reference, gateway]
    append_s = plan.warmup_s + plan.seconds + 120

    def scenario(letter: str, title: str, run) -> None:
        if letter not in only:
            return
        print(f"{letter}: {title}", flush=True)
        started = time.monotonic()
        try:
            rewrites = compact_aof(redis.port)  # every scenario starts on a freshly rewritten AOF
            run()
            # A rewrite Redis started by itself during the scenario is recorded, not hidden.
            during = results.setdefault("aofRewritesDuring", {})[letter] = aof_rewrites(redis.port) - rewrites
            if during:
                print(f"  note: {during} AOF rewrite(s) of Redis's own ran during this scenario", flush=True)
        except (HarnessError, EmbeddedError, OSError, subprocess.SubprocessError, RedisError) as error:
            errors.append(f"{letter}: {error}")
            print(f"  harness error: {error}", file=sys.stderr, flush=True)
        for server in servers:  # a server process that died is a finding, not a harness failure
            gone = [pid for pid in server.pids if not cmdline(pid)]
            if gone:
                warnings.append(f"{letter}: {server.name}: processes {gone} are gone")
                print(f"  warning: {warnings[-1]}", file=sys.stderr, flush=True)
                if server.proc is not None and server.proc.poll() is None:
                    server.pids = process_tree(server.proc.pid)  # count the replacements from now on
        print(f"  ({time.monotonic() - started:.0f} s)", flush=True)

    append_params = {"deadline_s": append_s, "writers": plan.writers, "seconds": plan.seconds,
                     "warmupS": plan.warmup_s, "bodyBytes": BODY_BYTES}  # fmt: skip

    def append(key: str, idempotent: bool) -> None:
        results[key] = both(servers, "append", prefix=key, idempotent=idempotent, **append_params)

    def catchup() -> None:
        results["catchup"] = {
            f"{messages:,}": both(
                servers,
                "catchup",
                deadline_s=300,
                name="catchup",
                messages=messages,
                batch=1000,
                repeats=reads,
                bodyBytes=BODY_BYTES,
            )  # fmt: skip
            for messages, reads in plan.catchup
        }

    def fanout() -> None:
        subs, messages, rate = plan.fanout
        results["fanout"] = both(
            servers, "fanout", deadline_s=120, prefix="fanout", streams=1, subsPerStream=subs, messagesPerStream=messages,
            rate=rate, bodyBytes=BODY_BYTES, connectConcurrency=50, drainS=10, connectTimeoutS=10,
        )  # fmt: skip

    def longpoll() -> None:
        results["longpoll"] = both(
            servers, "longpoll", deadline_s=90, name="longpoll", rounds=plan.longpoll_rounds, delayMs=20, seconds=60,
            bodyBytes=BODY_BYTES,
        )  # fmt: skip

    def scale() -> None:
        # One replica: one gateway process (--workers 1) on the same Redis.
        single = start_gateway(procs, redis.url, 1, args.logs / "gateway-single.log")
        single.redis_pid, single.redis_port = redis.proc.pid, redis.port
        try:
            results["scale"] = {}
            for label, streams, subs, messages, rate, target in plan.scale:
                result = run_loadgen(
                    single, "fanout", deadline_s=180, prefix=unique("scale"), streams=streams, subsPerStream=subs,
                    messagesPerStream=messages, rate=rate, bodyBytes=BODY_BYTES, connectConcurrency=100,
                    drainS=15, connectTimeoutS=20,
                )  # fmt: skip
                result["servedTargetMs"] = target
                results["scale"][label] = result
                print(f"  {label}: done", flush=True)
        finally:
            assert single.proc is not None
            procs.stop(single.proc)

    def wrk() -> None:
        results["wrk"] = cross_check(gateway, plan, {**append_params, "idempotent": False})

    scenario(
        "a", f"append, {plan.writers} writers on {plan.writers} streams", lambda: append("append", False)
    )
    scenario("b", f"append, {plan.writers} idempotent producers", lambda: append("idempotent", True))
    scenario("c", "catch-up from -1", catchup)
    scenario("d", "SSE fan-out", fanout)
    scenario("e", "long-poll wake-up", longpoll)
    scenario("f", "SSE scale on one replica (ours only)", scale)
    scenario("wrk", "load generator cross-check: (a) from wrk and from the generator, ds-gateway", wrk)


def machine() -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "commit": commit, "node": node}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s scenarios and fewer messages (~2 minutes)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the harness's own test
    parser.add_argument("--only", default=",".join(ALL_SCENARIOS), help="comma-separated: a,b,c,d,e,f,wrk")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check")
    parser.add_argument(
        "--auth", action="store_true", help="auth on: every request carries a bearer token (skips wrk)"
    )
    parser.add_argument("--seconds", type=float, help="length of the measured window of (a), (b) and wrk")
    parser.add_argument(
        "--gateway-workers", type=int, default=os.cpu_count() or 1, help="dsgw serve --workers"
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".bench", help="where results-<time>.json goes")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {ALL_SCENARIOS}")
    if (args.no_wrk or args.auth) and "wrk" in args.only:
        args.only.remove("wrk")  # the wrk script sends no token
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.auth:
        enable_auth()
    if args.seconds:
        plan = dataclasses.replace(plan, seconds=args.seconds)
    ensure_bench_tools()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.logs = args.out / f"logs-{started}"  # the gateways' stderr, kept for a look after errors
    args.logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": started, "machine": machine(), "plan": dataclasses.asdict(plan), "setup": {}}
    procs = Processes()
    results: dict = {}
    errors: list[str] = []
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dsgw-bench-") as tmp:
        try:
            run_scenarios(args, plan, procs, Path(tmp), results, report["setup"], errors, warnings)
        except (HarnessError, EmbeddedError, OSError, subprocess.SubprocessError) as error:
            errors.append(str(error))
            print(f"harness error: {error}", file=sys.stderr)
        finally:
            procs.stop_all()
    report["errors"] = errors
    report["warnings"] = warnings
    report["machine"]["loadavgAfter"] = os.getloadavg()
    rows = bench_report.all_rows(results)
    report["results"] = results
    report["table"] = [row.as_dict() for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{started}.json"
    path.write_text(json.dumps(report, indent=1))
    print()
    print(bench_report.render(rows))
    print(bench_report.render_loadgen(results))
    print(f"results: {path}; gateway logs: {args.logs}")
    if warnings:
        print("warnings:\n  " + "\n  ".join(warnings), file=sys.stderr)
    if errors:
        print("harness errors:\n  " + "\n  ".join(errors), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
