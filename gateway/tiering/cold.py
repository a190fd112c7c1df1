"""A read below a stream's trim point (the read scripts answered 'cold'):
served from the history database, or refused the way the protocol says
when there is none (410) or it does not answer (503)."""

from __future__ import annotations

import logging

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


async def read_cold(
    history: History | None,
    stream: str,
    after: EntryId,
    upper: EntryId,
    trim: EntryId,
    base: EntryId,
    max_bytes: int,
    max_entries: int,
    *,
    json: bool,
) -> Slice:
    """Rows of `stream` in (after, upper] (upper <= trim), above `base`."""
    if history is None:
        metrics.COLD_READ_ERRORS.labels("no_history").inc()
        raise ProblemError(
            410,
            "Offset below the retained data",
            f"messages up to offset {format_offset(trim)} were removed; "
            f"read from {format_offset(trim)} (header Stream-Earliest-Offset)",
            headers={EARLIEST_OFFSET_HEADER: format_offset(trim)},
        )
    try:
        rows = await history.read_rows(stream, after, upper, base, max_bytes, max_entries, json=json)
    except HistoryUnavailable as exc:
        metrics.COLD_READ_ERRORS.labels("unavailable").inc()
        log.warning("history unavailable: %s", exc)
        raise ProblemError(
            503,
            "History unavailable",
            "reads below the trim point need Postgres",
            headers={"retry-after": "1"},
        ) from None
    if not rows.count:
        # trim > base always holds, and every entry at or below trim is committed
        # to stream_history before Redis lets it go: rows are missing.
        metrics.COLD_READ_ERRORS.labels("missing").inc()
        log.error(
            "history rows missing",
            extra={
                "fields": {"stream": stream, "after": format_offset(after), "upper": format_offset(upper)}
            },
        )
        raise ProblemError(
            503, "History incomplete", "rows below the trim point are missing", headers={"retry-after": "1"}
        )
    metrics.COLD_READS.inc()
    metrics.COLD_READ_BYTES.inc(len(rows.body))
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
