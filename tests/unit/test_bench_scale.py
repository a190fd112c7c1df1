"""The cost model of docs/scaling.md (e2e/bench_scale.py's projection)."""

from __future__ import annotations

import pytest

from e2e.bench_scale import project


def test_a_shared_two_core_machine_is_bound_by_its_cores():
    p = project(replicas=2, masters=3, cores=2, gateway_us=206, redis_us=68, client_us=40)
    assert p.bound == "machine cores"
    assert p.appends_per_s == pytest.approx(2e6 / 314)


def test_dedicated_machines_are_bound_by_the_gateway_or_the_masters():
    gateways = project(replicas=4, masters=3, cores=64, gateway_us=200, redis_us=70)
    assert (gateways.bound, gateways.appends_per_s) == ("gateway processes", pytest.approx(20_000))
    masters = project(replicas=40, masters=2, cores=64, gateway_us=200, redis_us=70)
    assert masters.bound == "redis masters" and masters.appends_per_s == pytest.approx(2e6 / 70)
