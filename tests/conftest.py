"""Shared fixtures: a real redis-server and real gateway processes (uvicorn over
HTTP), all started and stopped by the test session itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.embedded import (
    PostgresProcess,
    RedisProcess,
    free_port,
    start_postgres,
    start_redis,
    stop_child,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stream_url(self, name: str) -> str:
        return f"{self.url}/v1/stream/{name}"

    def stop(self, timeout_s: float = 15.0) -> int:
        return stop_child(self.proc, timeout_s=timeout_s)


def start_gateway(redis_url: str, log_dir: Path, **env: str) -> GatewayProcess:
    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    full_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DSGW_LONG_POLL_TIMEOUT_MS": "500",
        **env,
    }
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    # Listening comes before the live subscription is up: wait for /readyz.
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"gateway on {port} never became ready; see {log_path}")
        time.sleep(0.02)
    return GatewayProcess(proc, port, log_path)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"), persistent=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A Redis of the module's own. Every replica on a Redis serves every
    subscription's deliveries and timers, so gateways started with other
    subscription settings (DSGW_WEBHOOK_ALLOW_PRIVATE, ...) must not share one
    with the session's `gateway` fixtures, which refuse loopback webhooks."""
    server = start_redis(tmp_path_factory.mktemp("module-redis"), persistent=False)
    yield server
    server.stop()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout_s: float = 15.0) -> int:
        return stop_child(self.proc, timeout_s=timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_worker(kind: str, redis_url: str, database_url: str, log_dir: Path, **env: str) -> WorkerProcess:
    log_path = log_dir / f"{kind}-{free_port()}.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", kind],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return WorkerProcess(proc, log_path)


def reachable_tmp_dir(prefix: str) -> Path:
    """A temp dir the unprivileged postgres user can enter (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    base = reachable_tmp_dir("dsgw-test-pg-")
    server = start_postgres(base / "pg", durable=False, log_file=base / "postgres.log")
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def gateway(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(redis_server.url, tmp_path_factory.mktemp("gw"))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_b(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A second, independent gateway process on the same Redis."""
    gw = start_gateway(redis_server.url, tmp_path_factory.mktemp("gwb"))
    yield gw
    gw.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


async def wait_until(predicate, timeout_s: float = 30.0, every_s: float = 0.1):  # type: ignore[no-untyped-def]
    """Await `predicate()` until it returns something truthy (or time runs out); its last value."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every_s)


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A stream name no other test uses."""
    import uuid

    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
