"""The dispatcher's round over every shard's wake queue: one replica per
interval (the lease in Redis), every replica at start. Pure logic on fakeredis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Any

import fakeredis

from gateway import keys
from gateway.subscriptions.dispatch import Dispatcher


class FakeState:
    def __init__(self, redis: fakeredis.FakeAsyncRedis) -> None:
        self.redis = redis
        self.lock = asyncio.Lock()  # one fake connection: the dispatcher sends a command per shard at once

    async def execute(self, *command: Any, key: str) -> Any:
        async with self.lock:
            return await self.redis.execute_command(*command)


def dispatcher(redis: fakeredis.FakeAsyncRedis, full_poll_ms: int) -> tuple[Dispatcher, list[int]]:
    subs: Any = SimpleNamespace(
        state=FakeState(redis), settings=SimpleNamespace(subscriptions_full_poll_ms=full_poll_ms)
    )
    d = Dispatcher(subs, poll_s=0.5, sweep_s=30)
    rounds: list[int] = []
    real = d.drain_shards

    async def counted(shards: list[int]) -> list[int]:
        if len(shards) == keys.SHARDS:
            rounds.append(1)
        return await real(shards)

    d.drain_shards = counted  # type: ignore[method-assign]
    return d, rounds


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_only_the_lease_holder_makes_the_periodic_round_over_every_queue() -> None:
    redis = fakeredis.FakeAsyncRedis()
    await redis.sadd(keys.SUBSCRIPTIONS, "s")
    # Another replica holds the lease: after its own round at start, this one skips.
    await redis.set(keys.SUB_FULL_POLL_LEASE, "other", px=60_000)
    d, rounds = dispatcher(redis, full_poll_ms=20)  # raised to the 100 ms floor
    takes: list[bool] = []  # what each attempt at the lease returned
    take = d._take_full_poll_lease

    async def recorded() -> bool:
        takes.append(await take())
        return takes[-1]

    d._take_full_poll_lease = recorded  # type: ignore[method-assign]
    task = asyncio.create_task(d._drain_loop())
    try:
        await wait_until(lambda: len(takes) >= 3)  # three intervals after the round at start
        assert len(rounds) == 1 and not any(takes)
        # The holder is gone: its lease runs out (here: removed), this replica
        # takes over. (Its own 90 ms lease may have run out again by the time
        # we look, so the attempts are checked, not the key.)
        await redis.delete(keys.SUB_FULL_POLL_LEASE)
        await wait_until(lambda: len(rounds) >= 3)
        assert takes.count(True) >= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_notified_shard_is_polled_alone_and_drained() -> None:
    redis = fakeredis.FakeAsyncRedis()
    d, rounds = dispatcher(redis, full_poll_ms=60_000)
    drained: list[str] = []

    async def drain_queue(queue: str) -> None:
        drained.append(queue)
        await redis.delete(queue)

    d.drain_queue = drain_queue  # type: ignore[method-assign]
    task = asyncio.create_task(d._drain_loop())
    try:
        await wait_until(lambda: rounds)  # the round at start (no subscription: nothing to do)
        queue = keys.wake_queue_key(7)
        await redis.zadd(queue, {"a": 1})
        d._on_wake(7, 1)
        await wait_until(lambda: drained == [queue])
        assert len(rounds) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
