"""`dsgw dev` is safe to run: it refuses taken ports instead of attaching to
someone else's servers, restarts children that die (and says so), and tells the
other commands where it runs through DATA_DIR/dev.json."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.embedded import (
    EmbeddedError,
    _wait_until_redis_is,
    free_port,
    start_postgres,
    start_redis,
    stop_child,
    wait_for_port,
)
from tests.conftest import ROOT, reachable_tmp_dir

# Variables a developer's shell may carry that would change what dev mode starts.
_CLEAN = ("REDIS_URL", "DATABASE_URL", "DSGW_DATA_DIR", "DSGW_DEV_REDIS_PORT", "DSGW_DEV_POSTGRES_PORT")


def dev_env(data_dir: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    return {**base, "DSGW_DATA_DIR": str(data_dir), "DSGW_LONG_POLL_TIMEOUT_MS": "500", **env}


def dsgw(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


class DevRun:
    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.stderr_path = data_dir.parent / f"{data_dir.name}-console.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "dev", "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("wb"),
            text=True,
        )
        self.summary: dict[str, str] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep and key.isupper():
                self.summary[key] = value
            if line.startswith("try:"):
                break
        assert self.summary, f"dsgw dev printed no summary: {self.console()}"
        wait_for_port(self.port, timeout_s=30, proc=self.proc)

    def console(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_console(self, text: str, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while text not in self.console():
            assert time.monotonic() < deadline, f"{text!r} never appeared on the console:\n{self.console()}"
            assert self.proc.poll() is None, self.console()
            time.sleep(0.1)
        return self.console()

    def child_pid(self, pattern: str, timeout_s: float = 15) -> int:
        """The pid of the child whose command line matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", pattern], capture_output=True)
            if found.returncode == 0:
                return int(found.stdout.split()[0])
            assert time.monotonic() < deadline, f"no child {pattern!r}: {self.console()}"
            time.sleep(0.1)

    def stop(self) -> int:
        return stop_child(self.proc, signal.SIGINT, timeout_s=30)


def test_dev_refuses_a_taken_gateway_port(tmp_path, listener, redis_server):
    result = dsgw(
        "dev",
        "--port",
        str(listener),
        "--no-workers",
        env=dev_env(tmp_path / "data", REDIS_URL=redis_server.url),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"dsgw: port {listener} (the gateway) is already in use: stop what listens there"
        " or pass --port (make run PORT=...)"
    ]
    assert not (tmp_path / "data" / "dev.json").exists()


def test_dev_refuses_to_share_another_redis(tmp_path, redis_server):
    """The embedded Redis's port answered by another Redis (a second `dsgw dev`
    with another data dir): refuse, one line, before starting anything."""
    env = dev_env(tmp_path / "data", DSGW_DEV_REDIS_PORT=str(redis_server.port))
    result = dsgw("dev", "--port", str(free_port()), "--no-workers", env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"port {redis_server.port} (embedded Redis) is already in use" in line
    assert "DSGW_DEV_REDIS_PORT" in line
    assert not (tmp_path / "data" / "redis").exists()


def test_embedded_redis_never_passes_another_redis_for_its_own(tmp_path, redis_server):
    # Past the port check (a race), whatever answers on the port must be the
    # process we started: here a live process that is not that Redis.
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(EmbeddedError, match=f"port {redis_server.port} is answered by another process"):
            _wait_until_redis_is(stranger, redis_server.port, timeout_s=1)
    finally:
        stranger.kill()
        stranger.wait()
    with pytest.raises(EmbeddedError, match=str(redis_server.port)):
        start_redis(tmp_path / "r", port=redis_server.port, persistent=False)


def test_embedded_postgres_never_passes_another_postgres_for_its_own(postgres_server):
    base = reachable_tmp_dir("dsgw-test-pg2-")
    with pytest.raises(EmbeddedError):
        start_postgres(base / "pg", port=postgres_server.port, durable=False)


def test_dev_restarts_a_dead_redis_and_the_cli_finds_it(tmp_path, unique):
    data_dir = tmp_path / "data"
    run = DevRun(data_dir, dev_env(data_dir, DSGW_DEV_REDIS_PORT=str(free_port())), "--no-workers")
    try:
        state = json.loads((data_dir / "dev.json").read_text())
        assert state["pid"] == run.proc.pid
        assert state["redis_url"] == run.summary["REDIS_URL"]
        assert state["base_url"] == run.summary["BASE_URL"] == f"http://127.0.0.1:{run.port}"

        # No REDIS_URL: the CLI reads the state file of the dev instance in its data dir.
        cli_env = dev_env(data_dir)
        import httpx

        httpx.put(f"{state['base_url']}/v1/stream/{unique}", headers={"content-type": "text/plain"})
        listed = dsgw("streams", env=cli_env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert unique in listed.stdout

        redis_port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])
        os.kill(run.child_pid("redis-server"), signal.SIGKILL)
        console = run.wait_console("embedded Redis restarted")
        assert "dsgw dev: embedded Redis exited with code -9; restarting in 1 s" in console
        wait_for_port(redis_port)
        assert unique in dsgw("streams", env=cli_env, cwd=tmp_path).stdout  # the AOF kept it
    finally:
        assert run.stop() in (0, 130)
    assert not (data_dir / "dev.json").exists()
    result = dsgw("streams", env=dev_env(data_dir), cwd=tmp_path)
    assert result.returncode == 1
    assert "REDIS_URL is not set and no `dsgw dev` runs from" in result.stderr


def test_dev_reports_and_restarts_a_dead_worker(tmp_path, redis_server, postgres_server):
    data_dir = tmp_path / "data"
    env = dev_env(data_dir, REDIS_URL=redis_server.url, DATABASE_URL=postgres_server.url)
    run = DevRun(data_dir, env)
    try:
        state = json.loads((data_dir / "dev.json").read_text())
        # Each worker has a metrics port of its own (a shared one killed the second).
        assert set(state["worker_metrics"]) == {"sink", "source"}
        assert len(set(state["worker_metrics"].values())) == 2
        os.kill(run.child_pid("worker sink"), signal.SIGKILL)
        console = run.wait_console("sink worker restarted")
        assert "dsgw dev: sink worker exited with code -9; restarting in 1 s" in console
        assert f"(log: {data_dir}/sink.log)" in console
        new_state = json.loads((data_dir / "dev.json").read_text())
        # The restarted worker got a fresh metrics port, and the state file says which.
        assert new_state["worker_metrics"]["sink"] != state["worker_metrics"]["sink"]
    finally:
        assert run.stop() in (0, 130)
