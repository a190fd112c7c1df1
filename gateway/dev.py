"""`dsgw dev` (and `make run`): the whole system on one machine, safely.

- Every port it wants is checked first; a taken one stops it with one line,
  before anything started (it never attaches to someone else's Redis or
  Postgres, and never shares another instance's).
- It supervises its children (embedded Redis and Postgres, the sink and source
  workers): each death is printed on the console with the last line of the
  child's log, and the child is restarted with backoff.
- It writes the URLs it chose to DATA_DIR/dev.json (gateway/devstate.py), which
  the other `dsgw` commands read when REDIS_URL / DATABASE_URL are unset.

The gateway itself runs in this process (uvicorn in the main thread); the
supervisor is a thread beside it."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devstate
from .embedded import EmbeddedError, die_with_parent, free_port, start_postgres, start_redis, stop_child

DEFAULT_REDIS_PORT = 6390
DEFAULT_POSTGRES_PORT = 6391
# Restart delays: doubling from the first to the cap; a child that ran this
# long before dying starts again from the first delay.
BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 30.0
HEALTHY_AFTER_S = 30.0


class DevError(Exception):
    """Why `dsgw dev` cannot start, in one line."""


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the servers we start: a port in TIME_WAIT is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise DevError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return False


def check_ports(wanted: list[tuple[str, str, int, str]]) -> None:
    """(what, host, port, how to pick another) for each port; DevError on the first taken one."""
    for what, host, port, hint in wanted:
        if port_in_use(host, port):
            raise DevError(f"port {port} ({what}) is already in use: stop what listens there or {hint}")


@dataclass
class WorkerHandle:
    """A `dsgw worker KIND` child; SIGTERM makes it finish its batch and exit."""

    kind: str
    proc: subprocess.Popen
    metrics_url: str

    def stop(self) -> None:
        stop_child(self.proc)


def start_worker(kind: str, log_path: Path) -> WorkerHandle:
    # A port of its own each time it starts: two workers never fight over one,
    # and a restart never waits for the dead one's port.
    port = free_port()
    env = {**os.environ, "DSGW_WORKER_METRICS_PORT": str(port), "DSGW_WORKER_METRICS_HOST": "127.0.0.1"}
    log = open(log_path, "ab")  # noqa: SIM115 (the child keeps it)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", kind],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=die_with_parent,
        )
    finally:
        log.close()
    return WorkerHandle(kind, proc, f"http://127.0.0.1:{port}/metrics")


def last_log_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log, for the console message about a death."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class Child:
    """One supervised child: how to start it, where it logs, when to restart it."""

    name: str
    start: Callable[[], Any]
    log_path: Path
    handle: Any = None
    started_at: float = 0.0
    delay_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts the children in order, restarts any that dies, stops them in reverse."""

    say: Callable[[str], None]
    on_restart: Callable[[], object] = lambda: None
    children: list[Child] = field(default_factory=list)
    poll_s: float = 0.2
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, child: Child) -> Any:
        """Start `child` now (an error here aborts `dsgw dev`) and supervise it."""
        child.handle = child.start()
        child.started_at = time.monotonic()
        self.children.append(child)
        return child.handle

    def run_in_background(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsgw-dev-supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 (a bug here must not end supervision silently)
                self.say(f"dsgw dev: supervisor error: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """One round: notice deaths, restart children whose delay is over."""
        now = time.monotonic()
        for child in self.children:
            if self._stop.is_set():
                return
            if child.restart_at is None:
                code = child.handle.proc.poll()
                if code is None:
                    continue
                if now - child.started_at >= HEALTHY_AFTER_S:
                    child.delay_s = BACKOFF_FIRST_S
                last = last_log_line(child.log_path)
                self.say(
                    f"dsgw dev: {child.name} exited with code {code}; restarting in {child.delay_s:g} s"
                    f" (log: {child.log_path})" + (f"\n  last log line: {last}" if last else "")
                )
                child.restart_at = now + child.delay_s
                child.delay_s = min(child.delay_s * 2, BACKOFF_CAP_S)
            elif now >= child.restart_at:
                try:
                    child.handle = child.start()
                except Exception as exc:  # whatever it is, retry later rather than give up
                    self.say(f"dsgw dev: {child.name} did not start: {exc}; next try in {child.delay_s:g} s")
                    child.restart_at = now + child.delay_s
                    child.delay_s = min(child.delay_s * 2, BACKOFF_CAP_S)
                    continue
                child.started_at, child.restart_at = time.monotonic(), None
                child.restarts += 1
                self.on_restart()  # the state file first: whoever reads the console line finds it current
                self.say(f"dsgw dev: {child.name} restarted (pid {child.handle.proc.pid})")

    def stop(self) -> None:
        """Stop supervising, then stop every child, the last started first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for child in reversed(self.children):
            if child.restart_at is None:
                child.handle.stop()


@dataclass
class DevPlan:
    host: str
    port: int
    data_dir: Path
    workers: bool
    redis_port: int = DEFAULT_REDIS_PORT
    postgres_port: int = DEFAULT_POSTGRES_PORT


def plan_from_env(host: str, port: int, data_dir: Path, workers: bool) -> DevPlan:
    def env_port(name: str, default: int) -> int:
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise DevError(f"{name}={raw!r} is not a port number")
        return int(raw)

    return DevPlan(
        host=host,
        port=port,
        data_dir=data_dir.resolve(),
        workers=workers,
        redis_port=env_port("DSGW_DEV_REDIS_PORT", DEFAULT_REDIS_PORT),
        postgres_port=env_port("DSGW_DEV_POSTGRES_PORT", DEFAULT_POSTGRES_PORT),
    )


def start_all(plan: DevPlan, supervisor: Supervisor) -> devstate.DevState:
    """Check every port, then start the embedded servers and workers under
    `supervisor`; sets REDIS_URL / DATABASE_URL for the gateway in this process."""
    running = devstate.read(plan.data_dir)
    if running is not None:
        raise DevError(
            f"dsgw dev already runs from {plan.data_dir} (pid {running.pid}, {running.base_url});"
            " stop it first or set DSGW_DATA_DIR to another directory"
        )
    embedded_redis = not os.environ.get("REDIS_URL")
    embedded_pg = plan.workers and not os.environ.get("DATABASE_URL")
    wanted = [("the gateway", plan.host, plan.port, "pass --port (make run PORT=...)")]
    if embedded_redis:
        wanted.append(("embedded Redis", "127.0.0.1", plan.redis_port, "set DSGW_DEV_REDIS_PORT"))
    if embedded_pg:
        wanted.append(("embedded Postgres", "127.0.0.1", plan.postgres_port, "set DSGW_DEV_POSTGRES_PORT"))
    check_ports(wanted)
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if embedded_redis:
            redis_log = plan.data_dir / "redis.log"
            redis = supervisor.add(
                Child(
                    "embedded Redis",
                    lambda: start_redis(
                        plan.data_dir / "redis",
                        port=plan.redis_port,
                        persistent=True,
                        path_min_version=(7, 0),
                        log_file=redis_log,
                    ),
                    redis_log,
                )
            )
            os.environ["REDIS_URL"] = redis.url
        if embedded_pg:
            pg_log = plan.data_dir / "postgres.log"
            pg = supervisor.add(
                Child(
                    "embedded Postgres",
                    lambda: start_postgres(plan.data_dir / "pg", port=plan.postgres_port, log_file=pg_log),
                    pg_log,
                )
            )
            os.environ["DATABASE_URL"] = pg.url
        if plan.workers:
            for kind in ("sink", "source"):
                log_path = plan.data_dir / f"{kind}.log"
                supervisor.add(
                    Child(f"{kind} worker", lambda k=kind, p=log_path: start_worker(k, p), log_path)  # type: ignore[misc]
                )
    except EmbeddedError as exc:
        raise DevError(f"{exc} (logs in {plan.data_dir})") from None
    return current_state(plan, supervisor)


def current_state(plan: DevPlan, supervisor: Supervisor) -> devstate.DevState:
    return devstate.DevState(
        pid=os.getpid(),
        base_url=f"http://{plan.host}:{plan.port}",
        redis_url=os.environ["REDIS_URL"],
        database_url=os.environ.get("DATABASE_URL", "") if plan.workers else "",
        worker_metrics={
            c.handle.kind: c.handle.metrics_url
            for c in supervisor.children
            if isinstance(c.handle, WorkerHandle)
        },
    )
