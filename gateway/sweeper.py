"""The fork sweeper. Forks with a TTL or Expires-At are never left to Redis
key expiry: removing a fork must also release the reference it holds on its
source (otherwise a deleted source is kept, soft-deleted, forever). The
scripts record each such fork's deadline in its shard's `dsforks:{sNN}`
(gateway/keys.py); every DSGW_FORK_SWEEP_MS each gateway process reads the
metadata of the forks whose deadline has passed, and that read removes an
expired fork and releases its source like any other access would. Idempotent:
any number of replicas may sweep at once."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from .keys import SHARDS, fork_deadlines_key
from .protocol import ProblemError
from .store import Store

log = logging.getLogger("dsgw.sweeper")

BATCH = 100  # forks looked at per shard and sweep


async def sweep_forks_once(store: Store) -> int:
    """Remove the forks whose deadline has passed; returns how many went.

    One task whatever the shard count: the ZRANGEBYSCOREs of all shards are
    issued at once, and the mux (gateway/redis_mux.py) sends them pipelined,
    one write per Redis node."""
    now_ms = int(time.time() * 1000)
    keys = [fork_deadlines_key(shard) for shard in range(SHARDS)]
    replies = await asyncio.gather(
        *(
            store.mux.execute("ZRANGEBYSCORE", key, "-inf", now_ms, "LIMIT", 0, BATCH, key=key)
            for key in keys
        ),
        return_exceptions=True,
    )
    removed = 0
    failed: BaseException | None = None
    for key, due in zip(keys, replies, strict=True):
        if isinstance(due, BaseException):
            failed = due  # one node down: sweep the others' shards anyway
            continue
        for raw in due:
            name = raw.decode()
            try:
                await store.read(name, None, touch=False, max_bytes=0, max_entries=0)
            except ProblemError:
                # 404: expired, removed now (its source released) or earlier;
                # 410: soft-deleted, kept for forks of its own. Nothing left to do.
                await store.mux.execute("ZREM", key, name, key=key)
                removed += 1
    if failed is not None and not isinstance(failed, RedisError | OSError):
        raise failed
    if failed is not None:
        log.warning("fork sweep skipped shards: %s: %s", type(failed).__name__, failed)
    return removed


async def sweep_forks_forever(store: Store, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await sweep_forks_once(store)
        except RedisError as exc:
            log.warning("fork sweep failed: %s: %s", type(exc).__name__, exc)
            continue
        if removed:
            log.info("expired forks removed", extra={"fields": {"forks": removed}})
