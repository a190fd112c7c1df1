"""Shard tags spread over cluster slots, and the recorded shard layout."""

from __future__ import annotations

import hashlib
from collections import Counter

import fakeredis
import pytest
from redis.crc import key_slot

from gateway import keys
from gateway.keys import (
    LAYOUT_KEY,
    feed_key,
    layout_name,
    shard_of,
    shard_of_tag,
    shard_tags,
    split_stream_key,
    stream_keys_in,
)
from gateway.layout import LayoutMismatch, check_layout
from gateway.shard_tags import SLOTS, balanced_tags, target_slot


def cli_ranges(masters: int) -> list[range]:
    """The slot ranges `redis-cli --cluster create` gives `masters` masters."""
    per, first, ranges = SLOTS / masters, 0, []
    for i in range(masters):
        last = SLOTS - 1 if i == masters - 1 else round(first + per - 1)
        ranges.append(range(first, last + 1))
        first = last + 1
    return ranges


@pytest.mark.parametrize("shards", [1, 64, 256, 1000, 1024, 4096])
def test_each_balanced_tag_hashes_to_the_middle_of_its_own_slot_range(shards):
    tags = balanced_tags(shards)
    assert len(tags) == len(set(tags)) == shards
    for shard, tag in enumerate(tags):
        slot = key_slot(tag.encode())
        assert slot == target_slot(shard, shards)
        assert shard * SLOTS // shards <= slot < (shard + 1) * SLOTS // shards + 1


def test_the_tag_enumeration_never_changes():
    # Changing it would move every stream of every deployment to other keys.
    digest = hashlib.sha256(" ".join(balanced_tags(1024)).encode()).hexdigest()[:16]
    assert digest == "3cae6fe3bde1bbb5"
    assert balanced_tags(64)[:3] == ("t96e", "tfrs", "t0it")
    assert shard_tags(16) == tuple(f"{{s{i:02d}}}" for i in range(16))  # the legacy layout


@pytest.mark.parametrize("masters", [3, 6, 10, 16, 50])
def test_every_master_holds_the_same_number_of_shards_within_one(masters):
    ranges = cli_ranges(masters)
    owner = Counter(
        next(i for i, r in enumerate(ranges) if key_slot(tag[1:-1].encode()) in r) for tag in shard_tags(1024)
    )
    assert len(owner) == masters
    assert max(owner.values()) - min(owner.values()) <= 1


def test_the_legacy_layout_is_what_it_was_and_splits_unevenly():
    owner = Counter(
        next(i for i, r in enumerate(cli_ranges(3)) if key_slot(tag[1:-1].encode()) in r)
        for tag in shard_tags(16)
    )
    assert sorted(owner.values()) == [4, 4, 8]  # why the default changed
    assert (
        stream_keys_in("chat/room-1", 16).meta
        == f"ds:{{s{shard_of('chat/room-1', 16):02d}}}:chat/room-1:meta"
    )


@pytest.mark.parametrize("shards", [16, 64, 1024])
def test_keys_of_a_layout_share_one_slot_and_read_back(shards):
    for name in ("chat/room-1", "a:b:c", "x}y", "ü"):
        k = stream_keys_in(name, shards)
        assert len({key_slot(key.encode()) for key in [*k.all, k.channel, k.creating]}) == 1
        assert k.feed == feed_key(k.shard, shards)
        tag, back, suffix = split_stream_key(k.data) or ("", "", "")
        assert (shard_of_tag(shards)[tag], back, suffix) == (k.shard, name, "data")


def test_layout_names():
    assert layout_name(16) == "legacy-16"
    assert layout_name(1024) == "balanced-1024"
    assert keys.SHARDS == 1024  # the default (tests run without DSGW_SHARDS)


async def test_a_fresh_redis_records_the_layout_and_another_count_is_refused():
    r = fakeredis.FakeAsyncRedis()
    assert await check_layout(r, 1024) == "balanced-1024"
    assert await r.get(LAYOUT_KEY) == b"balanced-1024"
    assert await check_layout(r, 1024) == "balanced-1024"
    with pytest.raises(
        LayoutMismatch, match=r"layout balanced-1024 but DSGW_SHARDS=64 .* set DSGW_SHARDS=1024"
    ):
        await check_layout(r, 64)


async def test_a_redis_written_before_layouts_were_recorded_is_legacy():
    r = fakeredis.FakeAsyncRedis()
    await r.hset("ds:{s07}:chat/room-1:meta", "ct", "application/json")
    with pytest.raises(
        LayoutMismatch, match="legacy-16 .* set DSGW_SHARDS=16, or .* `dsgw reshard --to 1024`"
    ):
        await check_layout(r, 1024)
    assert await r.get(LAYOUT_KEY) is None  # nothing recorded: DSGW_SHARDS=16 may still start
    assert await check_layout(r, 16) == "legacy-16"


async def test_a_reshard_in_progress_is_refused():
    r = fakeredis.FakeAsyncRedis()
    await r.set(LAYOUT_KEY, "resharding:legacy-16:balanced-64")
    with pytest.raises(LayoutMismatch, match="being resharded"):
        await check_layout(r, 64)


async def test_a_shard_count_beyond_the_slots_is_refused():
    with pytest.raises(LayoutMismatch, match="DSGW_SHARDS=20000: a shard count must be between 1 and 16384"):
        await check_layout(fakeredis.FakeAsyncRedis(), 20000)
