"""The live hub's wake-up logic on fakeredis pub/sub (no server needed)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from gateway.live import LiveHub


@pytest.fixture
async def hub():
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    hub = LiveHub(redis, recheck_s=30)
    await hub.start()
    for _ in range(100):
        if hub.ready:
            break
        await asyncio.sleep(0.01)
    yield hub, redis
    await hub.stop()


async def test_a_publish_wakes_every_local_reader_of_that_channel_only(hub):
    hub, redis = hub
    async with hub.watch("ch:a") as w1, hub.watch("ch:a") as w2, hub.watch("ch:b") as other:
        for w in (w1, w2, other):
            await w.subscribed()
        waits = [asyncio.create_task(w.wait(5)) for w in (w1, w2, other)]
        await asyncio.sleep(0.05)
        await redis.publish("ch:a", "1-0")
        done, pending = await asyncio.wait(waits, timeout=2)
        assert waits[0] in done and waits[1] in done and waits[2] in pending
        assert waits[0].result() is True
        waits[2].cancel()


async def test_a_notification_between_read_and_wait_is_not_lost(hub):
    hub, redis = hub
    async with hub.watch("ch:race") as watch:
        await watch.subscribed()
        # The reader has its watch, reads (nothing), and before it waits an
        # append is published: the wait must return at once.
        await redis.publish("ch:race", "1-0")
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(watch.wait(5), 1) is True


async def test_wait_times_out_without_notification(hub):
    hub, _ = hub
    async with hub.watch("ch:quiet") as watch:
        await watch.subscribed()
        assert await watch.wait(0.05) is False
    assert hub.reader_count == 0
