"""The shard layout a Redis was written with, recorded once and checked at
every start, so a process with another DSGW_SHARDS never re-keys a
deployment's streams silently (it would see none of them and write new ones
beside them).

The first process to start on an empty Redis records its layout in
gateway/keys.py's LAYOUT_KEY. A Redis written before layouts were recorded
holds keys tagged {s00}..{s15}: that is the legacy layout, and only
DSGW_SHARDS=16 may use it (or `dsgw reshard --to N` moves it).
"""

from __future__ import annotations

from typing import Any

from .keys import LAYOUT_KEY, LEGACY_SHARDS, SHARDS, layout_name, shard_tags

# Keys of the legacy layout: a stream's own keys, and the feeds / fork deadlines.
LEGACY_PATTERNS = ("ds:{s[0-9][0-9]}:*", "dsfeed:{s[0-9][0-9]}", "dsforks:{s[0-9][0-9]}")


class LayoutMismatch(Exception):
    """This process's DSGW_SHARDS is not the layout the Redis holds."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def has_legacy_keys(client: Any) -> bool:
    """Any key of the legacy layout (a SCAN: run only while no layout is recorded)."""
    for pattern in LEGACY_PATTERNS:
        async for _ in client.scan_iter(match=pattern, count=1000):
            return True
    return False


async def recorded_layout(client: Any) -> str | None:
    raw = await client.get(LAYOUT_KEY)
    return None if raw is None else _text(raw)


async def check_layout(client: Any, shards: int = SHARDS) -> str:
    """Record this process's layout on a fresh Redis, or raise LayoutMismatch
    (one line: what the Redis holds, what to do). `client`: redis-py's
    client (standalone or cluster). Returns the layout."""
    try:
        shard_tags(shards)
    except ValueError as exc:
        raise LayoutMismatch(f"DSGW_SHARDS={shards}: {exc}") from None
    expected = layout_name(shards)
    recorded = await recorded_layout(client)
    if recorded is None:
        if shards != LEGACY_SHARDS and await has_legacy_keys(client):
            recorded = layout_name(LEGACY_SHARDS)
        else:
            await client.set(LAYOUT_KEY, expected, nx=True)
            recorded = await recorded_layout(client) or expected
    if recorded != expected:
        if recorded.startswith("resharding:"):
            raise LayoutMismatch(
                f"Redis is being resharded ({recorded}): finish it with `dsgw reshard` before starting"
            )
        count = recorded.rpartition("-")[2]
        raise LayoutMismatch(
            f"Redis holds streams in shard layout {recorded} but DSGW_SHARDS={shards} means {expected}:"
            f" set DSGW_SHARDS={count}, or stop every process and run `dsgw reshard --to {shards}`"
        )
    return recorded
