"""Health, readiness across a Redis restart, request ids and access logs."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from gateway.embedded import start_redis
from tests.conftest import start_gateway


def test_request_ids_are_echoed_or_made_and_logged(redis_server, tmp_path, unique):
    gw = start_gateway(redis_server.url, tmp_path, DSGW_ACCESS_LOG="true")
    try:
        with httpx.Client(timeout=10) as http:
            mine = http.put(gw.stream_url(unique), headers={"x-request-id": "req-42"})
            made = http.get(gw.stream_url(unique))
            assert mine.headers["x-request-id"] == "req-42"
            assert len(made.headers["x-request-id"]) == 16
            bad = http.get(gw.stream_url(unique), headers={"x-request-id": "x" * 200})
            assert bad.headers["x-request-id"] != "x" * 200
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    access = [
        line for line in lines if line["logger"] == "dsgw.access" and line["path"].startswith("/v1/stream/")
    ]
    assert {"request_id": "req-42", "method": "PUT", "status": 201}.items() <= access[0].items()
    assert len(access) == 3 and all(isinstance(line["ms"], float) for line in access)


async def test_readiness_follows_redis_and_live_readers_survive_its_restart(tmp_path, unique):
    redis = start_redis(tmp_path / "redis", persistent=True)
    gw = start_gateway(redis.url, tmp_path, DSGW_LONG_POLL_TIMEOUT_MS="20000", DSGW_LIVE_RECHECK_MS="60000")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(gw.url + "/readyz")).status_code == 200
            url = gw.stream_url(unique)
            await client.put(url, headers={"content-type": "text/plain"})
            poll = asyncio.create_task(client.get(url, params={"offset": "now", "live": "long-poll"}))
            await asyncio.sleep(0.3)
            port = redis.port
            redis.stop()
            not_ready = await client.get(gw.url + "/readyz")
            assert not_ready.status_code == 503 and not_ready.json()["redis"] is False
            assert (await client.get(gw.url + "/healthz")).status_code == 200  # alive all the same
            outage = await client.get(url)
            assert outage.status_code == 503
            assert outage.headers["content-type"] == "application/problem+json"
            redis = start_redis(tmp_path / "redis", port=port, persistent=True)
            deadline = time.monotonic() + 15
            while (await client.get(gw.url + "/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after Redis came back"
                await asyncio.sleep(0.1)
            # The waiting reader's subscription came back with the connection:
            # an append now wakes it (the periodic re-check is a minute away).
            await client.post(url, headers={"content-type": "text/plain"}, content=b"after restart")
            response = await asyncio.wait_for(poll, 10)
            assert response.status_code == 200 and response.content == b"after restart"
    finally:
        gw.stop()
        redis.stop()


def test_metrics_add_up_across_worker_processes(redis_server, tmp_path, unique):
    import os
    import subprocess
    import sys

    from gateway.embedded import free_port, stop_child, wait_for_port
    from tests.conftest import ROOT

    port = free_port()
    log_path = tmp_path / "workers.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**env, "REDIS_URL": redis_server.url, "DSGW_ACCESS_LOG": "true"},
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "wb"),  # noqa: SIM115
    )
    try:
        wait_for_port(port, proc=proc)
        url = f"http://127.0.0.1:{port}/v1/stream/{unique}"
        httpx.put(url, headers={"content-type": "text/plain"}, timeout=10)

        def serving_pids() -> set[int]:
            lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
            return {x["pid"] for x in lines if x["logger"] == "dsgw.access" and x["method"] == "POST"}

        appends = 0
        # New connections until both processes have taken appends (bounded).
        while appends < 400 and (appends < 20 or len(serving_pids()) < 2):
            response = httpx.post(url, headers={"content-type": "text/plain"}, content=b"x", timeout=10)
            assert response.status_code == 204
            appends += 1
        assert len(serving_pids()) == 2

        def scraped_total() -> float:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            return sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith('dsgw_appends_total{content_type="text/plain"}')
            )

        # Each process hands its counts over once a second (gateway/metrics.py
        # Batched): within a few seconds every process's appends are there,
        # whichever process answers the scrape.
        deadline = time.monotonic() + 5
        while (total := scraped_total()) != appends and time.monotonic() < deadline:
            time.sleep(0.2)
        assert total == appends
    finally:
        assert stop_child(proc) == 0
