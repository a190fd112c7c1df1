"""A read below a stream's trim point (the read scripts answered 'cold'):
served from the history database, or refused the way the protocol says
when there is none (410) or it does not answer (503)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from .. import metrics
from ..offsets import EntryId, format_offset
from ..protocol import ProblemError
from .history import History, HistoryUnavailable, Slice

log = logging.getLogger("dsgw.tiering")

# Where the data this server can still serve begins (410 without history,
# and on HEAD of a trimmed stream; see docs/http.md).
EARLIEST_OFFSET_HEADER = "stream-earliest-offset"
# Reads from this offset on are served from Redis (HEAD of a trimmed stream).
HOT_OFFSET_HEADER = "stream-hot-offset"


def _require(history: History | None, trim: EntryId) -> History:
    if history is not None:
        return history
    metrics.COLD_READ_ERRORS.labels("no_history").inc()
    raise ProblemError(
        410,
        "Offset below the retained data",
        f"messages up to offset {format_offset(trim)} were removed; "
        f"read from {format_offset(trim)} (header Stream-Earliest-Offset)",
        headers={EARLIEST_OFFSET_HEADER: format_offset(trim)},
    )


@contextlib.contextmanager
def _unavailable_is_503() -> Iterator[None]:
    try:
        yield
    except HistoryUnavailable as exc:
        metrics.COLD_READ_ERRORS.labels("unavailable").inc()
        log.warning("history unavailable: %s", exc)
        raise ProblemError(
            503,
            "History unavailable",
            "reads below the trim point need Postgres",
            headers={"retry-after": "1"},
        ) from None


def _missing(span: ColdRange) -> ProblemError:
    # trim > base always holds, and every entry at or below trim is committed
    # to stream_history before Redis lets it go: rows are missing.
    metrics.COLD_READ_ERRORS.labels("missing").inc()
    fields = {"stream": span.stream, "after": format_offset(span.after), "upper": format_offset(span.upper)}
    log.error("history rows missing", extra={"fields": fields})
    return ProblemError(
        503, "History incomplete", "rows below the trim point are missing", headers={"retry-after": "1"}
    )


@dataclass(frozen=True, slots=True)
class ColdRange:
    """The rows of `stream` in (after, upper], upper <= trim (the stream's trim
    point), above `base` (rows of a removed stream of the same name)."""

    stream: str
    after: EntryId
    upper: EntryId
    trim: EntryId
    base: EntryId


async def read_cold(
    history: History | None, span: ColdRange, max_bytes: int, max_entries: int, *, json: bool
) -> Slice:
    """The range as one response body, under the same rules as a Redis read."""
    with _unavailable_is_503():
        rows = await _require(history, span.trim).read_rows(
            span.stream, span.after, span.upper, span.base, max_bytes, max_entries, json=json
        )
    if not rows.count:
        raise _missing(span)
    metrics.COLD_READS.inc()
    metrics.COLD_READ_BYTES.inc(len(rows.body))
    return rows


async def read_cold_entries(
    history: History | None, span: ColdRange, limit: int
) -> list[tuple[EntryId, bytes, int]]:
    """Up to `limit` rows of the range as (entry ID, payload, more)."""
    with _unavailable_is_503():
        rows = await _require(history, span.trim).read_entries(
            span.stream, span.after, span.upper, span.base, limit
        )
    if not rows and limit:
        raise _missing(span)
    return rows


def retained_headers(trim: EntryId | None, has_history: bool) -> list[tuple[bytes, bytes]]:
    """HEAD of a trimmed stream: where Redis takes over (Stream-Hot-Offset)
    and, without a history database, where the data a read can still get
    begins (Stream-Earliest-Offset; with one, everything from -1 can be read)."""
    if trim is None:
        return []
    headers = [(HOT_OFFSET_HEADER.encode(), format_offset(trim).encode())]
    if not has_history:
        headers.append((EARLIEST_OFFSET_HEADER.encode(), format_offset(trim).encode()))
    return headers
