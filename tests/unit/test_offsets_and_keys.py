from __future__ import annotations

import pytest
from redis.crc import key_slot

from gateway.keys import SHARDS, name_from_meta_key, shard_tag, stream_keys
from gateway.offsets import (
    ZERO_OFFSET,
    BadOffset,
    entry_id_to_offset,
    format_offset,
    parse_entry_id,
    parse_offset,
)


def test_offsets_are_fixed_width_entry_ids_whose_string_order_is_numeric_order():
    ids = ["0-0", "5-1", "5-10", "1732434000123-0", "1732434000123-7", "99999999999999-3"]
    offsets = [entry_id_to_offset(i) for i in ids]
    assert offsets == sorted(offsets)
    assert offsets[0] == ZERO_OFFSET
    assert entry_id_to_offset(b"1732434000123-7") == "0001732434000123_0000000000000007"
    assert all(format_offset(parse_offset(o)) == o for o in offsets)


def test_suite_sentinel_like_offsets_parse():
    assert parse_offset("9999999999999999_9999999999999999") == (9999999999999999, 9999999999999999)
    assert parse_entry_id("12-3") == (12, 3)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-1",
        "now",
        "1",
        "1_",
        "_1",
        "1_2_3",
        "a_b",
        "1 _2",
        "１_2",
        "0,1",
        "../0_0",
        "0_0\n",
        "18446744073709551616_0",
    ],
)
def test_malformed_offsets_are_refused(bad):
    with pytest.raises(BadOffset):
        parse_offset(bad)


@pytest.mark.parametrize("name", ["chat/room-1", "a}b", "}x", "{x}", "%7D", "x{y}z", "ü/ß"])
def test_all_keys_of_a_stream_share_one_slot_and_names_round_trip(name):
    keys = stream_keys(name)
    slots = {key_slot(k.encode()) for k in [*keys.all, keys.channel]}
    assert len(slots) == 1
    assert name_from_meta_key(keys.meta) == name


def test_streams_spread_over_shards_and_share_their_shards_feed_slot():
    shards = {stream_keys(f"room-{i}").shard for i in range(20_000)}
    assert shards == set(range(SHARDS))
    keys = stream_keys("chat/room-1")
    assert keys.meta == f"ds:{shard_tag(keys.shard)}:chat/room-1:meta"
    assert keys.feed == f"dsfeed:{shard_tag(keys.shard)}"
    assert key_slot(keys.feed.encode()) == key_slot(keys.data.encode())
