"""Which streams a webhook body lists (gateway/subscriptions/wakebody.py)."""

from __future__ import annotations

import json

from gateway.subscriptions.wakebody import encoded_size, fit_streams


def infos(n: int) -> list[dict[str, object]]:
    return [
        {"path": f"events/s{i:05d}", "link_type": "glob", "acked_offset": "0" * 33,
         "tail_offset": "1" * 33, "has_pending": True}
        for i in range(n)
    ]  # fmt: skip


def body_size(envelope: dict[str, object], listed: list[dict[str, object]]) -> int:
    return len(json.dumps(dict(envelope, streams=listed), separators=(",", ":")).encode())


ENVELOPE = {"subscription_id": "s", "wake_id": "w_1", "generation": 1, "streams": [], "has_more": True}


def test_everything_is_listed_when_it_fits() -> None:
    pending = infos(10)
    assert fit_streams(pending, encoded_size(ENVELOPE), 256 * 1024, 1) == (pending, False)
    assert fit_streams([], encoded_size(ENVELOPE), 100, 1) == ([], False)


def test_a_body_never_exceeds_the_limit_and_fills_it() -> None:
    pending = infos(3000)
    limit = 256 * 1024
    for generation in (1, 2, 7, 1000):
        listed, more = fit_streams(pending, encoded_size(ENVELOPE), limit, generation)
        size = body_size(ENVELOPE, listed)
        assert more and size <= limit
        assert size + encoded_size(pending[0]) + 1 > limit  # no room for one more
        assert len({i["path"] for i in listed}) == len(listed)


def test_successive_generations_cover_every_stream() -> None:
    # Even if nothing is acked in between, consecutive wakes walk the list.
    pending = infos(3000)
    seen: set[object] = set()
    for generation in range(1, 4):
        listed, _ = fit_streams(pending, encoded_size(ENVELOPE), 256 * 1024, generation)
        seen.update(i["path"] for i in listed)
    assert len(seen) == 3000


def test_one_stream_is_listed_even_if_it_alone_is_too_big() -> None:
    listed, more = fit_streams(infos(3), encoded_size(ENVELOPE), 10, 1)
    assert len(listed) == 1 and more
