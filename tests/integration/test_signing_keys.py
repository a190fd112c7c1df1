"""Webhook signing keys in a real Redis shared by gateway replicas: two replicas
publish the same JWKS, and `dsgw rotate-keys` reaches both (published first,
signing later) without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.embedded import RedisProcess, start_redis
from tests.conftest import ROOT, GatewayProcess, start_gateway

JWKS = "/v1/stream/__ds/jwks.json"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    # Its own Redis: a rotation must not change the keys other tests' gateways use.
    server = start_redis(tmp_path / "redis", persistent=False)
    yield server
    server.stop()


@pytest.fixture
def two_replicas(own_redis: RedisProcess, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    replicas = [start_gateway(own_redis.url, tmp_path, DSGW_WEBHOOK_KEYS_REFRESH_S="1") for _ in range(2)]
    yield replicas
    for replica in replicas:
        replica.stop()


def kids(replica: GatewayProcess) -> list[str]:
    response = httpx.get(replica.url + JWKS, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jwk-set+json")
    return sorted(k["kid"] for k in response.json()["keys"])


def rotate(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "rotate-keys", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "DSGW_WEBHOOK_KEYS_REFRESH_S": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_until(predicate, what: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_replicas_share_keys_and_pick_up_a_rotation(two_replicas: list[GatewayProcess], own_redis) -> None:  # type: ignore[no-untyped-def]
    a, b = two_replicas
    before = kids(a)
    assert len(before) == 1 and before == kids(b) and before[0].startswith("ds_")

    rotated = rotate(own_redis.url, "signing", "--publish-ahead", "3")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split()[2]
    assert new_kid.startswith("ds_") and new_kid not in before
    # Published by both replicas (after their reload), the old key still with it.
    for replica in (a, b):
        wait_until(lambda r=replica: kids(r) == sorted([*before, new_kid]), "the new key in the JWKS")

    # Too short a publish-ahead (replicas might sign before others publish) and bad arguments: refused.
    refused = rotate(own_redis.url, "signing", "--publish-ahead", "1")
    assert refused.returncode == 1 and "DSGW_WEBHOOK_KEYS_REFRESH_S" in refused.stderr
    assert rotate(own_redis.url, "everything").returncode == 1
    rotated_token = rotate(own_redis.url, "token", "--publish-ahead", "3")
    assert rotated_token.returncode == 0 and rotated_token.stdout.startswith("token key tk_")
    assert kids(a) == sorted([*before, new_kid])  # a token key is never published
