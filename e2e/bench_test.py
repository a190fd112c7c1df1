"""Tests of the `make bench` harness: the report's arithmetic, and a tiny run of
every scenario against the real reference server and a real gateway.

    .venv/bin/python -m pytest e2e/bench_test.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e import bench_compare, bench_report
from e2e.bench_report import Row, Target
from gateway.embedded import start_redis

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:4599
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.06ms    7.69ms 189.89ms   99.03%
  22416 requests in 3.01s, 16.85MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   7453.83
"""


def test_targets_compare_ours_with_the_reference() -> None:
    assert Target("ratio>=", 1.0).passes(110, 100)
    assert not Target("ratio>=", 1.0).passes(90, 100)
    assert Target("ratio<=", 1.0).passes(9, 10)
    assert not Target("ratio<=", 1.0).passes(11, 10)
    assert Target("diff<=", 1.0).passes(2.9, 2.0)
    assert not Target("diff<=", 1.0).passes(3.1, 2.0)
    assert Target("<=", 150).passes(150, None)
    assert Target("==", 0).passes(0, None) and not Target("==", 0).passes(1, None)
    assert not Target("ratio>=", 0.5).passes(1, None)  # no reference: not a pass
    assert Row("x", "y", "", None, 1.0, Target("ratio>=", 1)).verdict == "MISS"
    assert Row("x", "y", "", 5.0).verdict == ""  # no target: information only


def test_append_rows_count_every_kind_of_loss() -> None:
    def result(rate: float, p99: float, **check: int) -> dict:
        read_back = {"missing": 0, "duplicate": 0, "outOfOrder": 0, "unexpected": 0, "foreign": 0, **check}
        return {"perSecond": rate, "latencyMs": {"p50": 1, "p99": p99}, "statuses": {"204": 10, "503": 2},
                "readBack": read_back}  # fmt: skip

    rows = {row.metric: row for row in bench_report.append_rows("a", {
        "ours": result(2000, 5, duplicate=1, outOfOrder=2), "reference": result(1000, 10)})}  # fmt: skip
    assert rows["appends/s"].ratio == 2.0 and rows["appends/s"].verdict == "PASS"
    assert rows["latency p99"].verdict == "PASS"
    assert rows["failed requests"].ours == 2 and rows["failed requests"].verdict == "MISS"
    assert rows["read back: lost+dup+out-of-order"].ours == 3


def test_cpu_per_append_divides_the_window_cpu_by_the_window_appends() -> None:
    ours = {"acked": 1000, "cpu": {"groups": {"server": {"cpuS": 0.5}, "redis": {"cpuS": 0.1}},
                                   "redisCommands": {"evalsha": {"calls": 1000, "usec": 50_000}}}}  # fmt: skip
    rows = {row.metric: row for row in bench_report.cpu_rows({"append": {"ours": ours}})}
    assert rows["append: server CPU"].ours == pytest.approx(500)
    assert rows["append: Redis CPU"].ours == pytest.approx(100)
    assert rows["append: Redis commandstats"].ours == pytest.approx(50)


def test_wrk_summary_is_parsed_and_compared_within_ten_percent() -> None:
    parsed = bench_compare.parse_wrk(WRK_OUTPUT)
    assert parsed == {"perSecond": 7453.83, "requests": 22416, "non2xx": 5, "socketErrors": 3}
    close = {row.metric: row for row in bench_report.wrk_rows({**parsed, "loadgenPerSecond": 7000})}
    assert close["difference"].verdict == "PASS"
    assert close["wrk failed requests"].ours == 8 and close["wrk failed requests"].verdict == "MISS"
    far = {row.metric: row for row in bench_report.wrk_rows({**parsed, "loadgenPerSecond": 6000})}
    assert far["difference"].verdict == "MISS"
    with pytest.raises(bench_compare.HarnessError):
        bench_compare.parse_wrk("connection refused")


def test_process_tree_finds_grandchildren() -> None:
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    procs = bench_compare.Processes()
    procs.started.append(parent)
    try:
        deadline = time.monotonic() + 10
        while len(bench_compare.process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = bench_compare.process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
    finally:
        procs.stop_all()

    def gone(pid: int) -> bool:  # a killed orphan may linger a moment as a zombie (empty cmdline)
        return not Path(f"/proc/{pid}").exists() or bench_compare.cmdline(pid) == ""

    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in tree)


@pytest.fixture(scope="module")
def bench_tools() -> None:
    """The benchmark's npm tools (e2e/bench), installed like `make bench` does."""
    bench_compare.ensure_bench_tools()


NEEDS_BENCH_TOOLS = pytest.mark.usefixtures("bench_tools")


@NEEDS_BENCH_TOOLS
def test_an_open_loop_writer_faster_than_the_server_keeps_each_streams_order(tmp_path: Path) -> None:
    """The fan-out writer pipelines appends it cannot wait for; the server must see them in
    send order, so every subscriber reads them in order."""
    procs = bench_compare.Processes()
    try:
        redis = start_redis(tmp_path / "redis", persistent=False)
        procs.started.append(redis.proc)
        gateway = bench_compare.start_gateway(procs, redis.url, 1, tmp_path / "gateway.log")
        result = bench_compare.run_loadgen(
            gateway, "fanout", deadline_s=60, prefix=bench_compare.unique("pipe"), streams=2, subsPerStream=2,
            messagesPerStream=200, rate=2000, bodyBytes=100, connectConcurrency=4, drainS=20, connectTimeoutS=10,
        )  # fmt: skip
    finally:
        procs.stop_all()
    assert result["appendStatuses"] == {"204": 400}
    assert result["delivered"] == result["expectedDeliveries"] == 800
    assert result["outOfOrder"] == result["duplicate"] == result["missing"] == 0
    assert result["maxPipelined"] > 1  # appends were sent before the previous one was answered


@NEEDS_BENCH_TOOLS
def test_a_tiny_run_measures_every_scenario_on_both_servers(tmp_path: Path) -> None:
    assert bench_compare.main(["--smoke", "--no-wrk", "--gateway-workers", "2", "--out", str(tmp_path)]) == 0
    (saved,) = tmp_path.glob("results-*.json")
    report = json.loads(saved.read_text())
    assert report["errors"] == [] and report["warnings"] == []
    results = report["results"]
    for key in ("append", "idempotent", "fanout", "longpoll"):
        assert set(results[key]) == {"ours", "reference"}, key
    assert results["idempotent"]["ours"]["statuses"] == {"200": results["idempotent"]["ours"]["ackedTotal"]}
    assert results["append"]["ours"]["cpu"]["groups"]["redis"]["cpuS"] > 0
    assert results["append"]["ours"]["cpu"]["redisCommands"]["evalsha"]["calls"] > 0
    # Every gateway process is counted: the uvicorn parent, its helpers and both workers (the
    # kernel may hand all of 4 connections to one of them).
    per_pid = results["append"]["ours"]["cpu"]["groups"]["server"]["perPid"]
    assert len(per_pid) >= 3 and sum(per_pid.values()) > 0
    assert all(r["wrongReads"] == 0 for pair in results["catchup"].values() for r in pair.values())
    assert len(results["scale"]) == 2
    # Every scenario started on a freshly rewritten AOF, and says how many rewrites ran during it.
    assert set(results["aofRewritesDuring"]) == {"a", "b", "c", "d", "e", "f"}
    table = {(row["scenario"], row["metric"]): row for row in report["table"]}
    # Correctness holds on both servers, whatever the speed.
    for (_, metric), row in table.items():
        if row["target"] == "= 0":
            assert row["ours"] == 0, (metric, row)
            assert row["reference"] in (0, None), (metric, row)
    assert table[("a append", "appends/s")]["ratio"] is not None
    assert table[("e long-poll", "wake p50")]["verdict"] in ("PASS", "MISS")


@NEEDS_BENCH_TOOLS
def test_a_terminated_run_leaves_no_process_behind(tmp_path: Path) -> None:
    harness = subprocess.Popen(
        [sys.executable, "-m", "e2e.bench_compare", "--smoke", "--only", "f", "--out", str(tmp_path)],
        cwd=bench_compare.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert harness.stdout is not None
        for line in harness.stdout:  # (f) runs once the reference, Redis and the gateway are up
            if line.startswith("f:"):
                break
        time.sleep(1)
        started = bench_compare.process_tree(harness.pid)[1:]
        assert len(started) >= 4  # reference, redis, gateway parent and workers (and more)
        harness.terminate()
        assert harness.wait(60) == 143
    finally:
        if harness.poll() is None:
            harness.kill()
    deadline = time.monotonic() + 10
    while any(bench_compare.cmdline(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [bench_compare.cmdline(pid) for pid in started if bench_compare.cmdline(pid)]
