"""Prometheus metrics, all named dsgw_<thing>_<unit>.

With `dsgw serve --workers N` every process counts for itself; `serve` then
sets PROMETHEUS_MULTIPROC_DIR (before this module is imported anywhere) and
/metrics adds all processes up, so a scrape sees the whole server."""

from __future__ import annotations

import os
from typing import Any

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

HTTP_DURATION = Histogram(
    "dsgw_http_request_duration_seconds",
    "From a request's arrival to its response (SSE: to the stream's start), by method, route and status",
    ["method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0),
)
LIVE_REFUSED = Counter(
    "dsgw_live_refused_total", "Live reads refused with 503: the replica's DSGW_MAX_LIVE_CONNECTIONS reached"
)
SSE_CUT_OFF = Counter(
    "dsgw_sse_cut_off_total", "SSE readers cut off for taking no data for DSGW_SSE_SEND_TIMEOUT_MS"
)
LIVE_READERS_LONG_POLL = LIVE_READERS.labels("long-poll")
LIVE_READERS_SSE = LIVE_READERS.labels("sse")

REDIS_CALL_SECONDS = Histogram(
    "dsgw_redis_call_seconds",
    "Round trip of one Lua script call to Redis, by script",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)


# Labelled children, looked up once per label set: labels() costs more than inc().
_appends: dict[str, tuple[Any, Any]] = {}
_requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"))


def count_append(media_type: str, size: int) -> None:
    children = _appends.get(media_type)
    if children is None:
        children = _appends[media_type] = (APPENDS.labels(media_type), APPEND_BYTES.labels(media_type))
    children[0].inc()
    children[1].inc(size)


def count_request(method: str, route: str, status: int, seconds: float) -> None:
    """One answered request: dsgw_responses_total and the latency histogram."""
    if method not in _METHODS:
        method = "OTHER"  # any token is a method: keep the label set bounded
    key = (method, route, status)
    children = _requests.get(key)
    if children is None:
        children = _requests[key] = (
            RESPONSES.labels(method, str(status)),
            HTTP_DURATION.labels(method, route, str(status)),
        )
    children[0].inc()
    children[1].observe(seconds)


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
