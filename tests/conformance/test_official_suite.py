"""The official conformance suite, pinned at 0.3.6, over real HTTP against a
gateway process on a real redis-server."""

from __future__ import annotations

from e2e.conformance import EXPECTED_TESTS, run_suite


def test_official_conformance_suite_passes_completely(gateway):
    result = run_suite(gateway.url, quiet=True)
    print(result.summary())
    assert result.failures == []
    assert (result.passed, result.failed) == (EXPECTED_TESTS, 0)
