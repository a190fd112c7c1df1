"""Prometheus metrics, all named dsgw_<thing>_<unit>.

With `dsgw serve --workers N` every process counts for itself; `serve` then
sets PROMETHEUS_MULTIPROC_DIR (before this module is imported anywhere) and
/metrics adds all processes up, so a scrape sees the whole server."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

APPENDS = Counter("dsgw_appends_total", "Accepted appends", ["content_type"])
APPEND_BYTES = Counter("dsgw_append_bytes_total", "Bytes of accepted appends", ["content_type"])
DUPLICATE_APPENDS = Counter(
    "dsgw_duplicate_appends_total", "Producer retries answered as duplicates, nothing written"
)
LIVE_READERS = Gauge(
    "dsgw_live_readers", "Live readers waiting (all processes)", ["mode"], multiprocess_mode="livesum"
)
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
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a finished process's live gauges from the multiprocess files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
