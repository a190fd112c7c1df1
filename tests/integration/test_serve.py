"""`dsgw serve --workers N` (gateway/serve.py): N processes on one port, each
with its own SO_REUSEPORT socket; connections spread over all of them; a
process that dies is restarted; a startup failure stops the server with an
error; SIGTERM drains every process and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.embedded import free_port, stop_child, wait_for_port
from tests.conftest import ROOT


def serve(redis_url: str, workers: int, log_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env={**clean, "REDIS_URL": redis_url, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "wb"),  # noqa: SIM115
    )
    return proc, port


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_for(predicate, seconds: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
    return value


def test_connections_spread_over_every_process_and_sigterm_drains(redis_server, tmp_path):
    log_path = tmp_path / "serve.log"
    proc, port = serve(redis_server.url, 2, log_path, DSGW_ACCESS_LOG="true")
    try:
        wait_for_port(port, proc=proc)
        wait_for(lambda: len(children(proc.pid)) == 2, 10)
        url = f"http://127.0.0.1:{port}/v1/stream/spread"
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, 15)
        httpx.put(url, headers={"content-type": "text/plain"})
        # 64 separate connections, as a client pool opens them.
        for _ in range(64):
            with httpx.Client() as client:
                assert (
                    client.post(url, headers={"content-type": "text/plain"}, content=b"x").status_code == 204
                )
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        per_pid: dict[int, int] = {}
        for line in lines:
            if line.get("logger") == "dsgw.access" and line.get("method") == "POST":
                per_pid[line["pid"]] = per_pid.get(line["pid"], 0) + 1
        assert len(per_pid) == 2 and min(per_pid.values()) >= 12, per_pid
    finally:
        assert stop_child(proc) == 0  # SIGTERM: every process drains, the server exits 0


def test_a_dead_process_is_restarted(redis_server, tmp_path):
    proc, port = serve(redis_server.url, 2, tmp_path / "serve.log")
    try:
        wait_for_port(port, proc=proc)
        first = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 10)
        time.sleep(10.5)  # past the startup window: a later death is a crash, not a failed start
        os.kill(first[0], signal.SIGKILL)
        replaced = wait_for(lambda: (c := children(proc.pid)) and len(c) == 2 and first[0] not in c and c, 10)
        assert first[1] in replaced
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, 15)
    finally:
        stop_child(proc)


def test_a_startup_failure_stops_the_server_with_an_error(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    unused = closed.getsockname()[1]
    closed.close()
    proc, _ = serve(f"redis://127.0.0.1:{unused}/0", 2, tmp_path / "serve.log")
    assert proc.wait(timeout=60) != 0
    assert "failed to start" in (tmp_path / "serve.log").read_text()
