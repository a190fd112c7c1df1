"""`make e2e`: one local stack (3 gateways behind nginx, a 3-master Redis
Cluster, Postgres, workers) for the whole session, torn down at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e import stack as stack_module

# The conformance suite needs short long-polls; SSE connections are recycled
# every 10 s so reconnects through the balancer happen during the tests too.
STACK_ENV = {
    "DSGW_LONG_POLL_TIMEOUT_MS": "500",
    "DSGW_SSE_MAX_LIFETIME_MS": "10000",
    "DSGW_SINK_CLAIM_IDLE_MS": "2000",
    # Long re-checks: a live reader that gets its message fast was woken by a
    # notification, not by the periodic re-read.
    "DSGW_LIVE_RECHECK_MS": "30000",
    # The subscription tests' webhook receivers listen on 127.0.0.1 (and the
    # official suite expects other private addresses refused).
    "DSGW_WEBHOOK_ALLOW_PRIVATE": "loopback",
}


def start_session_stack() -> stack_module.Stack:
    return stack_module.up(redis_mode="cluster", replicas=3, env=STACK_ENV)


@pytest.fixture(scope="session")
def stack() -> Iterator[stack_module.Stack]:
    running = start_session_stack()
    try:
        yield running
    finally:
        stack_module.down()
