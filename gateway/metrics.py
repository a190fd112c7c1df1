"""Prometheus metrics, all named dsgw_<thing>_<unit>.

With `dsgw serve --workers N` every process counts for itself; `serve` then
sets PROMETHEUS_MULTIPROC_DIR (before this module is imported anywhere) and
/metrics adds all processes up, so a scrape sees the whole server."""

from __future__ import annotations

import asyncio
import bisect
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
LIVE_SUBSCRIPTION_UP = Gauge(
    "dsgw_live_subscription_up",
    "1 while this process's live pub/sub subscription to Redis is up (lowest over processes)",
    multiprocess_mode="livemin",
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
PUSHED_READS = Counter(
    "dsgw_live_pushed_reads_total",
    "Long-polls answered from the data their append's notification carried, without reading Redis",
)
SSE_DIRECT_EVENTS = Counter(
    "dsgw_sse_direct_events_total",
    "SSE events written to a reader resting at its stream's tail by the stream's pump (no task wake-up)",
)
SSE_CUT_OFF = Counter(
    "dsgw_sse_cut_off_total", "SSE readers cut off for taking no data for DSGW_SSE_SEND_TIMEOUT_MS"
)
# Tiered history (gateway/tiering/): reads below a stream's trim point. No
# per-stream labels (unbounded); a stream's hot and cold ranges are in HEAD
# and `dsgw info`.
COLD_READS = Counter("dsgw_cold_reads_total", "Reads (chunks) served from the Postgres history")
COLD_READ_BYTES = Counter(
    "dsgw_cold_read_bytes_total", "Body bytes of reads served from the Postgres history"
)
COLD_READ_ERRORS = Counter(
    "dsgw_cold_read_errors_total",
    "Reads below the trim point not served: no_history (410), unavailable (503), missing rows (503)",
    ["reason"],
)
LIVE_READERS_LONG_POLL = LIVE_READERS.labels("long-poll")
LIVE_READERS_SSE = LIVE_READERS.labels("sse")

REDIS_CALL_SECONDS = Histogram(
    "dsgw_redis_call_seconds",
    "Round trip of one Lua script call to Redis, by script",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)


class Batched:
    """Hot-path updates kept in plain numbers and handed to prometheus_client
    by `flush` (once a second, and before every scrape of this process): a
    request then pays a dict lookup and an addition, not a lock and, under
    `serve --workers N`, mmap writes per metric."""

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        # histogram child -> [count per bucket..., sum]
        self._histograms: dict[Any, list[float]] = {}

    def inc(self, child: Any, amount: float = 1) -> None:
        self._counts[child] = self._counts.get(child, 0) + amount

    def observe(self, child: Any, value: float, times: int = 1) -> None:
        cells = self._histograms.get(child)
        if cells is None:
            cells = self._histograms[child] = [0.0] * (len(child._upper_bounds) + 1)
        cells[bisect.bisect_left(child._upper_bounds, value)] += times
        cells[-1] += value * times

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        histograms, self._histograms = self._histograms, {}
        for child, cells in histograms.items():
            # prometheus_client's Histogram.observe, for many values at once.
            for bucket, count in zip(child._buckets, cells[:-1], strict=True):
                if count:
                    bucket.inc(count)
            child._sum.inc(cells[-1])


BATCHED = Batched()

# Labelled children, looked up once per label set: labels() costs more than inc().
_appends: dict[str, tuple[Any, Any]] = {}
_requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"))


def count_append(media_type: str, size: int) -> None:
    children = _appends.get(media_type)
    if children is None:
        children = _appends[media_type] = (APPENDS.labels(media_type), APPEND_BYTES.labels(media_type))
    BATCHED.inc(children[0])
    BATCHED.inc(children[1], size)


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
    BATCHED.inc(children[0])
    BATCHED.observe(children[1], seconds)


async def flush_every_second() -> None:
    try:
        while True:
            await asyncio.sleep(1.0)
            BATCHED.flush()
    finally:
        BATCHED.flush()


def render() -> tuple[bytes, str]:
    BATCHED.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a finished process's live gauges from the multiprocess files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
