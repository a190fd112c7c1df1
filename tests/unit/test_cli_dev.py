"""Dev mode's logic without servers: the supervisor's restarts and backoff, the
port check, the state file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import dev, devstate


class FakeProc:
    pid = 4242

    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


class FakeHandle:
    """A child that has exited with `code` (None: still running)."""

    def __init__(self, code: int | None) -> None:
        self.proc = FakeProc(code)
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_supervisor_reports_each_death_and_restarts_with_growing_delays(tmp_path, monkeypatch):
    log = tmp_path / "sink.log"
    log.write_text('{"msg": "starting"}\n{"msg": "port 9464 is taken"}\n')
    clock = [1000.0]
    monkeypatch.setattr(dev.time, "monotonic", lambda: clock[0])
    said: list[str] = []
    restarts: list[int] = []
    starts = iter([FakeHandle(1), FakeHandle(1), FakeHandle(None)])
    supervisor = dev.Supervisor(say=said.append, on_restart=lambda: restarts.append(1))
    supervisor.add(dev.Child("sink worker", lambda: next(starts), log))

    supervisor.check()
    assert said == [
        f"dsgw dev: sink worker exited with code 1; restarting in 1 s (log: {log})\n"
        '  last log line: {"msg": "port 9464 is taken"}'
    ]
    clock[0] += 0.5
    supervisor.check()  # too early
    assert len(said) == 1
    clock[0] += 0.5
    supervisor.check()
    assert said[-1].startswith("dsgw dev: sink worker restarted (pid ")
    assert restarts == [1]
    supervisor.check()
    assert "restarting in 2 s" in said[-1]  # died again at once: the delay doubled
    clock[0] += 2
    supervisor.check()
    assert said[-1].startswith("dsgw dev: sink worker restarted")
    supervisor.check()  # the third one keeps running
    assert len(said) == 4
    supervisor.stop()
    assert supervisor.children[0].handle.stopped


def test_backoff_starts_over_after_a_healthy_run(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(dev.time, "monotonic", lambda: clock[0])
    said: list[str] = []
    supervisor = dev.Supervisor(say=said.append)
    child = dev.Child("source worker", lambda: FakeHandle(1), tmp_path / "none.log")
    child.delay_s = 16
    supervisor.add(child)
    clock[0] += dev.HEALTHY_AFTER_S
    supervisor.check()
    assert said == [
        f"dsgw dev: source worker exited with code 1; restarting in 1 s (log: {tmp_path}/none.log)"
    ]


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert dev.port_in_use("127.0.0.1", port)
        assert dev.port_in_use("0.0.0.0", port)
        with pytest.raises(dev.DevError, match="port .* \\(the gateway\\) is already in use"):
            dev.check_ports([("the gateway", "127.0.0.1", port, "pass --port")])
    assert not dev.port_in_use("127.0.0.1", port)


def test_state_file_round_trip_and_stale_files(tmp_path: Path):
    state = devstate.DevState(
        pid=os.getpid(), base_url="http://127.0.0.1:1", redis_url="redis://127.0.0.1:2/0"
    )
    devstate.write(tmp_path, state)
    assert devstate.read(tmp_path) == state
    devstate.remove(tmp_path, os.getpid() + 1)  # not its file: stays
    assert devstate.read(tmp_path) == state
    devstate.remove(tmp_path, os.getpid())
    assert devstate.read(tmp_path) is None

    # Left behind by a `dsgw dev` that was SIGKILLed: ignored.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    devstate.write(tmp_path, devstate.DevState(pid=dead.pid, base_url="x", redis_url="y"))
    assert devstate.read(tmp_path) is None
    (tmp_path / devstate.STATE_FILE).write_text("{not json")
    assert devstate.read(tmp_path) is None


def test_dev_ports_from_env_are_checked(monkeypatch):
    monkeypatch.setenv("DSGW_DEV_REDIS_PORT", "abc")
    with pytest.raises(dev.DevError, match="DSGW_DEV_REDIS_PORT='abc' is not a port number"):
        dev.plan_from_env("127.0.0.1", 4437, Path("data"), True)


def test_a_failed_restart_is_retried_with_backoff(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(dev.time, "monotonic", lambda: clock[0])
    said: list[str] = []
    starts = iter([FakeHandle(1)])

    def start() -> FakeHandle:
        handle = next(starts, None)
        if handle is None:
            raise RuntimeError("boom")
        return handle

    supervisor = dev.Supervisor(say=said.append)
    supervisor.add(dev.Child("sink worker", start, tmp_path / "sink.log"))
    supervisor.check()  # died: restart in 1 s
    clock[0] += 1
    supervisor.check()
    assert said[-1] == "dsgw dev: sink worker did not start: boom; next try in 2 s"
    supervisor.check()  # not again before those 2 s
    assert len(said) == 2


def test_an_unexpected_error_is_reported_and_supervision_goes_on(tmp_path):
    class BrokenProc(FakeProc):
        def poll(self) -> int | None:
            raise RuntimeError("boom")

    handle = FakeHandle(None)
    handle.proc = BrokenProc(None)
    said: list[str] = []
    supervisor = dev.Supervisor(say=said.append, poll_s=0.01)
    supervisor.add(dev.Child("sink worker", lambda: handle, tmp_path / "sink.log"))
    supervisor.run_in_background()
    deadline = time.monotonic() + 10
    while sum("supervisor error: RuntimeError: boom" in m for m in said) < 2:  # reported, and again
        assert time.monotonic() < deadline, said
        time.sleep(0.01)
    supervisor.stop()
    assert handle.stopped
