"""Hash tags for shards, spread evenly over Redis Cluster's 16,384 slots.

`redis-cli --cluster create` gives each master one contiguous range of slots
of (nearly) equal size. A shard's keys all live in the slot of its hash tag,
so if shard i's tag hashes to the middle of the i-th of N equal slot ranges,
every master owns N/K shards (give or take one) whatever K is, and streams
(crc32(name) mod N) spread over masters as evenly as over shards.

The tag of a slot is the first string of "t0", "t1", ..., "tz", "t00", ...
(base 36) whose CRC16 falls in it: a few tens of thousands of CRC16s, about
50 ms, computed once per process and shard count. The enumeration must never
change (it would move every stream): tests/unit/test_keys_layout.py pins it.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

from redis.crc import key_slot

SLOTS = 16384
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def target_slot(shard: int, shards: int) -> int:
    """The middle slot of the shard-th of `shards` equal slot ranges."""
    return (2 * shard + 1) * SLOTS // (2 * shards)


@lru_cache(maxsize=8)
def balanced_tags(shards: int) -> tuple[str, ...]:
    """Tag (without braces) of each of `shards` shards; distinct slots."""
    if not 1 <= shards <= SLOTS:
        raise ValueError(f"a shard count must be between 1 and {SLOTS}, not {shards}")
    wanted = {target_slot(i, shards): i for i in range(shards)}
    tags: list[str | None] = [None] * shards
    missing = shards
    for length in itertools.count(1):
        for combo in itertools.product(_ALPHABET, repeat=length):
            tag = "t" + "".join(combo)
            shard = wanted.pop(key_slot(tag.encode()), None)
            if shard is not None:
                tags[shard] = tag
                missing -= 1
                if not missing:
                    return tuple(t for t in tags if t is not None)
    raise AssertionError("unreachable")  # every slot has a tag of at most 5 characters
