"""Subscription metrics (rendered with the rest by gateway/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SUBSCRIPTIONS = Gauge(
    "dsgw_subscriptions", "Subscriptions (sampled by the recovery sweep)", multiprocess_mode="livemax"
)
PENDING_WAKES = Gauge(
    "dsgw_subscription_pending_wakes",
    "Streams with new data not yet handed to their subscriptions, over all shards' wake queues (sampled)",
    multiprocess_mode="livemax",
)
WAKES = Counter("dsgw_subscription_wakes_total", "Wakes issued (new generations) by this process")
DELIVERIES = Counter(
    "dsgw_subscription_deliveries_total",
    "Wake deliveries by type (webhook POST, pull-wake event) and outcome (sent, done, failed)",
    ["type", "outcome"],
)
LEASE_EXPIRIES = Counter("dsgw_subscription_lease_expiries_total", "Leases that ran out (holder cleared)")
CLAIMS = Counter("dsgw_subscription_claims_total", "Pull-wake claims granted")
TRUNCATED = Counter(
    "dsgw_subscription_webhook_bodies_truncated_total",
    "Webhook bodies that listed only some pending streams (has_more; the rest come in the next wake)",
)
