"""SIGTERM drains a gateway: live readers end cleanly at once, in-flight
appends finish, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.conftest import start_gateway

TEXT = {"content-type": "text/plain"}


async def test_sigterm_ends_live_reads_cleanly_and_finishes_appends(redis_server, tmp_path, unique):
    gw = start_gateway(redis_server.url, tmp_path, DSGW_LONG_POLL_TIMEOUT_MS="30000")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = gw.stream_url(unique)
            await client.put(url, headers=TEXT)
            poll = asyncio.create_task(client.get(url, params={"offset": "now", "live": "long-poll"}))

            async def sse_lines() -> list[str]:
                lines = []
                async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
                    async for line in response.aiter_lines():  # ends cleanly, or raises
                        lines.append(line)
                return lines

            sse = asyncio.create_task(sse_lines())
            await asyncio.sleep(0.5)
            appends = [
                asyncio.create_task(client.post(url, headers=TEXT, content=f"<{i}>".encode()))
                for i in range(20)
            ]
            await asyncio.sleep(0.01)
            started = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            statuses = [r.status_code for r in await asyncio.gather(*appends, return_exceptions=True)
                        if isinstance(r, httpx.Response)]  # fmt: skip
            polled = await poll
            lines = await sse
            assert polled.status_code in (200, 204)
            assert time.monotonic() - started < 5, "live readers must not hold the shutdown"
            assert lines[0] == "event: control"  # the stream ended normally, after its events
            # Every append the gateway accepted (none refused) finished with a success.
            assert all(s == 204 for s in statuses)
        assert gw.proc.wait(15) == 0
        assert time.monotonic() - started < 8
    finally:
        gw.stop()
