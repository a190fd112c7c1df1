"""Durable Streams request rules that need no storage: header parsing, JSON
message splitting, cursors. Every violation raises ProblemError (a 4xx)."""

from __future__ import annotations

import random
import re
import time
from datetime import datetime
from functools import lru_cache

MAX_SAFE_INT = 2**53 - 1
JSON_MEDIA_TYPE = "application/json"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
# A media type: type "/" subtype, both RFC 7230 tokens.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE_RE = re.compile(rf"{_TOKEN}/{_TOKEN}", re.ASCII)


class ProblemError(Exception):
    """A request the protocol refuses; rendered as application/problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def bad_request(title: str, detail: str = "") -> ProblemError:
    return ProblemError(400, title, detail)


# --- content types ---------------------------------------------------------


@lru_cache(maxsize=256)  # few distinct values: parse each once
def media_type(content_type: str) -> str:
    """The comparable part of a Content-Type: no parameters, trimmed, lowercase."""
    return content_type.split(";", 1)[0].strip().lower()


def checked_content_type(raw: str | None) -> str | None:
    """The Content-Type as sent, or None if absent; 400 if it is no media type."""
    if raw is None or not raw.strip():
        return None
    if not _MEDIA_TYPE_RE.fullmatch(media_type(raw)):
        raise bad_request("Malformed Content-Type", raw[:100])
    return raw.strip()


def is_json(media: str) -> bool:
    return media == JSON_MEDIA_TYPE


def sse_needs_base64(media: str) -> bool:
    """Binary-safe SSE: everything but text/* and application/json is base64."""
    return not (media.startswith("text/") or media == JSON_MEDIA_TYPE)


# --- creation headers --------------------------------------------------------


def _bounded_int(raw: str, pattern: re.Pattern[str], limit: int) -> int | None:
    """`raw` as an int if it matches `pattern` and is at most `limit`, else None.
    The length is checked before int(): Python refuses more than 4,300 digits."""
    significant = raw.lstrip("0") or "0"
    if not pattern.fullmatch(raw) or len(significant) > len(str(limit)):
        return None
    value = int(significant)
    return value if value <= limit else None


def parse_ttl(raw: str | None) -> int | None:
    if raw is None:
        return None
    ttl = _bounded_int(raw, _DECIMAL_RE, MAX_SAFE_INT // 1000)
    if ttl is None:
        raise bad_request("Invalid Stream-TTL", "must be a whole number of seconds")
    return ttl


def parse_expires_at(raw: str | None) -> tuple[str, int] | None:
    """Parse an RFC 3339 timestamp; return (as sent, milliseconds since the epoch)."""
    if raw is None:
        return None
    match = _RFC3339_RE.fullmatch(raw.strip())
    if not match:
        raise bad_request("Invalid Stream-Expires-At", "must be an RFC 3339 timestamp")
    date, clock, fraction, zone = match.groups()
    fraction = (fraction or "")[:7]  # Python parses at most microseconds
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        moment = datetime.fromisoformat(f"{date}T{clock}{fraction}{zone}")
    except ValueError as exc:
        raise bad_request("Invalid Stream-Expires-At", str(exc)) from None
    return raw, int(moment.timestamp() * 1000)


def parse_stream_closed(raw: str | None) -> bool:
    """Only `true` (any case) closes; any other value counts as absent."""
    return raw is not None and raw.strip().lower() == "true"


def parse_sub_offset(raw: str | None) -> int | None:
    if raw is None:
        return None
    sub_offset = _bounded_int(raw, _DECIMAL_RE, MAX_SAFE_INT)
    if sub_offset is None:
        raise bad_request("Invalid Stream-Fork-Sub-Offset", "must be a whole number")
    return sub_offset


# --- producers -----------------------------------------------------------------


def parse_producer(
    producer_id: str | None, epoch: str | None, seq: str | None
) -> tuple[str, int, int] | None:
    """The (id, epoch, seq) triple, None without producer headers; 400 if partial."""
    present = [h is not None for h in (producer_id, epoch, seq)]
    if not any(present):
        return None
    if not all(present):
        raise bad_request(
            "Incomplete producer headers",
            "Producer-Id, Producer-Epoch and Producer-Seq go together",
        )
    assert producer_id is not None and epoch is not None and seq is not None
    if producer_id == "":
        raise bad_request("Empty Producer-Id")
    numbers = []
    for name, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        number = _bounded_int(value, _DIGITS_RE, MAX_SAFE_INT)
        if number is None:
            raise bad_request(f"Invalid {name}", "must be an integer from 0 to 2^53-1")
        numbers.append(number)
    return producer_id, numbers[0], numbers[1]


# --- cursors ---------------------------------------------------------------------

CURSOR_EPOCH_S = 1728432000  # 2024-10-09T00:00:00Z
CURSOR_INTERVAL_S = 20


def next_cursor(client_cursor: str | None, now: float | None = None) -> str:
    """The Stream-Cursor for a live response: the current 20 s interval, or
    strictly more than the client's cursor (with jitter) so that caches keyed on
    the URL never serve a stale long-poll answer twice."""
    current = int(((now or time.time()) - CURSOR_EPOCH_S) // CURSOR_INTERVAL_S)
    if client_cursor and _DIGITS_RE.fullmatch(client_cursor) and len(client_cursor) < 19:
        previous = int(client_cursor)
        if previous >= current:
            jitter_s = random.randint(1, 3600)
            return str(previous + max(1, jitter_s // CURSOR_INTERVAL_S))
    return str(current)
