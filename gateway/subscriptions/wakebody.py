"""Which streams one webhook body lists, so that it stays within
DSGW_WEBHOOK_MAX_PAYLOAD_BYTES however many streams the subscription links.

Only streams with pending work (tail past the acked cursor) are listed. When
they do not all fit, the body lists as many as fit and carries
``"has_more": true`` (an addition to PROTOCOL.md's wake payload; without it the
body is exactly the protocol's). Nothing is lost: the streams left out are
still pending, so when this wake ends (callback with ``done``, or the
receiver answering ``{"done": true}``, which acks only the listed streams) the
subscription is woken again at once with the next ones. Successive wakes
start at a different place in the pending list (by generation), so streams
that keep getting appends cannot keep the others out of every body."""

from __future__ import annotations

import json
from typing import Any


def encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def fit_streams(
    pending: list[dict[str, Any]], envelope_bytes: int, limit: int, generation: int
) -> tuple[list[dict[str, Any]], bool]:
    """(the stream infos to list, whether some pending ones were left out).

    `envelope_bytes`: the size of the body with an empty ``streams`` array and
    ``has_more`` set; each listed stream adds its encoded size plus a comma.
    If not even one stream fits (a limit set absurdly low), one is listed
    anyway and the delivery refuses the body (a failed, retried delivery)."""
    if not pending:
        return [], False
    sizes = [encoded_size(info) for info in pending]
    if envelope_bytes + sum(sizes) + len(sizes) - 1 <= limit:
        return pending, False
    budget = limit - envelope_bytes
    average = sum(sizes) / len(sizes) + 1
    per_body = max(1, int(budget // average))
    start = ((generation - 1) * per_body) % len(pending)
    chosen: list[int] = []
    used = 0
    for k in range(len(pending)):
        i = (start + k) % len(pending)
        size = sizes[i] + (1 if chosen else 0)
        if chosen and used + size > budget:
            break
        chosen.append(i)
        used += size
    return [pending[i] for i in chosen], True
