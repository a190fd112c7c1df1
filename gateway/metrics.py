"""Prometheus metrics, all named dsgw_<thing>_<unit>."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

APPENDS = Counter("dsgw_appends_total", "Accepted appends", ["content_type"])
APPEND_BYTES = Counter("dsgw_append_bytes_total", "Bytes of accepted appends", ["content_type"])
DUPLICATE_APPENDS = Counter(
    "dsgw_duplicate_appends_total", "Producer retries answered as duplicates, nothing written"
)
LIVE_READERS = Gauge("dsgw_live_readers", "Live readers waiting in this process", ["mode"])
RESPONSES = Counter("dsgw_responses_total", "HTTP responses by method and status", ["method", "status"])
FANOUT_DELAY = Histogram(
    "dsgw_fanout_delivery_seconds",
    "From a stream notification reaching this process to a woken reader's response",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

REDIS_CALL_SECONDS = Histogram(
    "dsgw_redis_call_seconds",
    "Round trip of one Lua script call to Redis, by script",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
