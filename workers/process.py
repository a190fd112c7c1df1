"""What every worker process shares: signals that drain, a /healthz and
/metrics endpoint, backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("dsgw.worker")


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`: the worker finishes its batch and exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


Health = dict[str, Any]


async def serve_health(
    port: int, health: Callable[[], Health], host: str = "127.0.0.1"
) -> asyncio.Server | None:
    """A minimal HTTP endpoint: GET /metrics, and GET /healthz: `health()` as
    JSON, 200 while its "status" is "ok", else 503 (the body says why)."""
    if not port:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            request_line = (await reader.readline()).decode(errors="replace")
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = request_line.split(" ")[1] if " " in request_line else "/"
            if path.startswith("/metrics"):
                status, body, ctype = "200 OK", generate_latest(), CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                report = health()
                status = "200 OK" if report.get("status") == "ok" else "503 Service Unavailable"
                body, ctype = json.dumps(report).encode(), "application/json"
            else:
                status, body, ctype = "404 Not Found", b"", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port)


async def serve_until_stopped(worker: Any, settings: Any) -> None:
    """Run `worker` (with `stop`, `health()` and `run()`) until SIGTERM/SIGINT
    has drained it, with its /healthz and /metrics endpoint alongside."""
    install_stop_signals(worker.stop)
    server = await serve_health(settings.metrics_port, worker.health, settings.metrics_host)
    try:
        await worker.run()
    finally:
        if server:
            server.close()


class Backoff:
    """Exponential backoff for outages: 0.1 s doubling to 5 s, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    async def wait(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first
