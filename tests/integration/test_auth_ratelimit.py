"""Rate limits (gateway/ratelimit.py) shared by two gateway processes on one
Redis: appends per second and concurrent live connections, per credential,
with 429 + Retry-After, and a refused append that changes nothing."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProcess, start_gateway
from tests.integration.test_auth import ALL, AUDIENCE, ISSUER, JSON, SECRET, bearer, mint

APPENDS_PER_S = 2


def _start(redis_url: str, log_dir: Any, **env: str) -> GatewayProcess:
    return start_gateway(
        redis_url,
        log_dir,
        DSGW_AUTH_JWT_SECRET=SECRET,
        DSGW_AUTH_ISSUER=ISSUER,
        DSGW_AUTH_AUDIENCE=AUDIENCE,
        DSGW_RATE_APPENDS_PER_S=str(APPENDS_PER_S),
        DSGW_RATE_LIVE_CONNECTIONS="1",
        DSGW_LONG_POLL_TIMEOUT_MS="30000",
        **env,
    )


@pytest.fixture(scope="module")
def limited_pair(
    redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    a = _start(redis_server.url, tmp_path_factory.mktemp("rl-a"))
    b = _start(redis_server.url, tmp_path_factory.mktemp("rl-b"))
    yield a, b
    a.stop()
    b.stop()


def _stream(gw: GatewayProcess, headers: dict[str, str]) -> str:
    name = f"rl/{uuid.uuid4().hex[:10]}"
    assert httpx.put(gw.stream_url(name), headers={**JSON, **headers}).status_code == 201
    return name


def test_appends_per_second_are_shared_across_gateways(
    limited_pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = limited_pair
    user = bearer(mint(ALL, sub=f"user-{uuid.uuid4().hex[:6]}"))
    name = _stream(a, user)
    # Gateway A spends the credential's budget; gateway B must then refuse.
    # A one-second window may roll over between the requests on a loaded
    # machine: then the round proves nothing and is run again.
    for _ in range(10):
        statuses = [
            httpx.post(a.stream_url(name), content=b"{}", headers={**JSON, **user})
            for _ in range(APPENDS_PER_S)
        ]
        refused = httpx.post(b.stream_url(name), content=b'{"refused":true}', headers={**JSON, **user})
        if all(r.status_code == 204 for r in statuses) and refused.status_code == 429:
            break
    else:
        pytest.fail("gateway B never refused after gateway A used the budget")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"] == "application/problem+json"
    # The refused append changed nothing.
    body = httpx.get(a.stream_url(name), params={"offset": "-1"}, headers=user).json()
    assert {"refused": True} not in body


def test_other_credentials_keep_their_own_budget(limited_pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, b = limited_pair
    admin = bearer(mint(ALL, sub="admin"))
    name = _stream(a, admin)
    for _ in range(10):
        greedy = bearer(mint(ALL, sub=f"greedy-{uuid.uuid4().hex[:6]}"))
        other = bearer(mint(ALL, sub=f"other-{uuid.uuid4().hex[:6]}"))
        spent = [
            httpx.post(a.stream_url(name), content=b"{}", headers={**JSON, **greedy})
            for _ in range(APPENDS_PER_S + 1)
        ]
        if spent[-1].status_code != 429:
            continue  # the window rolled over mid-round
        assert httpx.post(b.stream_url(name), content=b"{}", headers={**JSON, **other}).status_code == 204
        return
    pytest.fail("the greedy credential was never limited")


def test_live_connections_are_shared_across_gateways(
    limited_pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = limited_pair
    user = bearer(mint(ALL, sub=f"live-{uuid.uuid4().hex[:6]}"))
    name = _stream(a, user)
    # With a message in it, a long-poll from -1 answers at once.
    assert httpx.post(a.stream_url(name), content=b"{}", headers={**JSON, **user}).status_code == 204
    opened = threading.Event()
    release = threading.Event()

    def hold_sse() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "GET", a.stream_url(name), params={"offset": "-1", "live": "sse"}, headers=user
            ) as r,
        ):
            assert r.status_code == 200
            opened.set()
            release.wait(30)

    holder = threading.Thread(target=hold_sse)
    holder.start()
    try:
        assert opened.wait(15)
        refused = httpx.get(b.stream_url(name), params={"offset": "now", "live": "long-poll"}, headers=user)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        # Catch-up reads are not live connections: still served.
        assert httpx.get(b.stream_url(name), params={"offset": "-1"}, headers=user).status_code == 200
    finally:
        release.set()
        holder.join()
    # The SSE connection closed: its slot is released, a live read goes through.
    url = b.stream_url(name)
    for _ in range(100):
        got = httpx.get(url, params={"offset": "-1", "live": "long-poll"}, headers=user, timeout=40)
        if got.status_code == 200:
            break
        assert got.status_code == 429
        threading.Event().wait(0.2)
    else:
        pytest.fail("the live slot was never released")
