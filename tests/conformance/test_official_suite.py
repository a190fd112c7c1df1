"""The official conformance suite, pinned at 0.3.6 with its optional
subscription tests, over real HTTP against a gateway process on a real
redis-server."""

from __future__ import annotations

from e2e.conformance import EXPECTED_TESTS, GATEWAY_ENV, run_suite
from tests.conftest import start_gateway


def test_official_conformance_suite_passes_completely(module_redis, tmp_path):
    # Its own gateway and Redis: the subscription tests' webhook receiver is on
    # loopback, which the session's gateways (sharing their Redis) would refuse.
    gateway = start_gateway(module_redis.url, tmp_path, **GATEWAY_ENV)
    try:
        result = run_suite(gateway.url, quiet=True)
    finally:
        gateway.stop()
    print(result.summary())
    assert result.failures == []
    assert (result.passed, result.failed) == (EXPECTED_TESTS, 0)
