"""gateway/lua/sink_read.lua on a real Redis: a batch holds at most the byte
budget plus one entry, for new entries and for entries taken over alike; in
strict mode (the sink's) at most the budget, an entry bigger than it alone
being refused (TOOBIG) and not delivered."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from workers.sink import GROUP, SINK_READ

KIB = 1024


@pytest.fixture
def feed(redis_server, unique) -> Iterator[tuple[redis.Redis, str]]:
    r = redis.Redis.from_url(redis_server.url)
    key = f"test:sink-read:{unique}"
    r.xgroup_create(key, GROUP, id="0", mkstream=True)
    yield r, key
    r.delete(key)


def take(
    r: redis.Redis,
    key: str,
    budget: int,
    *,
    most: int = 100,
    consumer: str = "c1",
    idle: str = "",
    strict: bool = False,
):  # type: ignore[no-untyped-def]
    return r.eval(SINK_READ, 1, key, GROUP, consumer, most, budget, idle, *(["strict"] if strict else []))


def measured(entries) -> int:  # type: ignore[no-untyped-def]
    """Bytes as the script measures them: ID, field names and values."""
    return sum(len(entry_id) + sum(len(part) for part in fields) for entry_id, fields in entries)


def sizes(entries) -> list[int]:  # type: ignore[no-untyped-def]
    return [len(fields[1]) for _, fields in entries]  # fields: [b"json", value]


def test_new_entries_stop_at_the_entry_that_reaches_the_budget(feed):  # type: ignore[no-untyped-def]
    r, key = feed
    for size in (100, 100, 100, 300 * KIB, 300 * KIB, 300 * KIB, 100, 100):
        r.xadd(key, {"json": b"x" * size})
    first = take(r, key, 500 * KIB)
    assert sizes(first) == [100, 100, 100, 300 * KIB, 300 * KIB]  # the 5th crosses 500 KiB
    assert sizes(take(r, key, 500 * KIB, most=2)) == [300 * KIB, 100]
    assert sizes(take(r, key, 1)) == [100]  # always at least one entry
    assert take(r, key, 500 * KIB) == []
    # Only what was returned was delivered: all 8 are pending, none twice.
    assert r.xpending(key, GROUP)["pending"] == 8


def test_taking_over_is_bounded_too_and_skips_trimmed_entries(feed):  # type: ignore[no-untyped-def]
    r, key = feed
    ids = [r.xadd(key, {"json": b"x" * (200 * KIB)}) for _ in range(4)]
    assert len(take(r, key, 10 * 1024 * KIB)) == 4  # delivered to c1, which then "dies"
    r.xdel(key, ids[0])  # trimmed while pending
    time.sleep(0.05)
    claimed = take(r, key, 300 * KIB, consumer="c2", idle="20")
    assert [entry_id for entry_id, _ in claimed] == ids[1:3]  # 200 KiB, then the one reaching 300
    consumers = {c["name"]: c["pending"] for c in r.xinfo_consumers(key, GROUP)}
    assert consumers == {b"c1": 1, b"c2": 2}  # the trimmed one was acknowledged away
    assert take(r, key, 300 * KIB, consumer="c2", idle="60000") == []  # nothing idle that long


def test_a_missing_feed_or_group_is_nogroup(redis_server, unique):  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_server.url)
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        take(r, f"test:sink-read:{unique}:absent", 100)


def test_strict_reads_never_pass_the_budget_and_refuse_a_lone_big_entry(feed):  # type: ignore[no-untyped-def]
    r, key = feed
    for size in (100, 100, 300 * KIB, 100):
        r.xadd(key, {"json": b"x" * size})
    first = take(r, key, 200 * KIB, strict=True)
    assert sizes(first) == [100, 100]  # the 300 KiB entry would pass the budget: left for later
    assert measured(first) <= 200 * KIB
    with pytest.raises(redis.ResponseError, match=r"^TOOBIG (\d+)$") as refused:
        take(r, key, 200 * KIB, strict=True)
    big = int(str(refused.value).split()[1])
    assert r.xpending(key, GROUP)["pending"] == 2  # the refused entry was not delivered
    again = take(r, key, big, strict=True)  # a budget of its reported size takes it
    assert sizes(again) == [300 * KIB] and measured(again) == big
    assert sizes(take(r, key, 200 * KIB, strict=True)) == [100]


def test_strict_taking_over_refuses_a_lone_big_entry_too(feed):  # type: ignore[no-untyped-def]
    r, key = feed
    ids = [r.xadd(key, {"json": b"x" * size}) for size in (300 * KIB, 100)]
    assert len(take(r, key, 1024 * KIB)) == 2
    time.sleep(0.05)
    with pytest.raises(redis.ResponseError, match="TOOBIG"):
        take(r, key, 100 * KIB, consumer="c2", idle="20", strict=True)
    consumers = {c["name"]: c["pending"] for c in r.xinfo_consumers(key, GROUP)}
    assert consumers == {b"c1": 2}  # nothing was taken over
    claimed = take(r, key, 1024 * KIB, consumer="c2", idle="20", strict=True)
    assert [entry_id for entry_id, _ in claimed] == ids
