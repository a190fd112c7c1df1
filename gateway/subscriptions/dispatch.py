"""The background work of subscriptions, one set of tasks per gateway process
(never one per shard):

- the dispatcher drains the shards' wake queues (`dswake:{tag}`, filled by
  append.lua / create.lua atomically with the append) and tells each linked
  subscription the stream's new tail (sub_notify.lua), issuing wakes. One
  pipelined round over every shard per poll, and only while any subscription
  exists; the pause between idle rounds grows from 20 ms to
  DSGW_SUBSCRIPTIONS_POLL_MS. A queue entry is claimed by re-scoring and removed only after every
  subscription heard of it, so a dispatcher that dies loses nothing: the entry
  falls due again after QUEUE_VISIBILITY_MS.
- the timer loop serves `dssubs:timers` (leases running out, deliveries to
  retry or to take over from a replica that died), any replica for any
  subscription.
- the recovery sweep, at start and every DSGW_SUBSCRIPTIONS_SWEEP_S, ticks
  every subscription, so work whose timer entry was lost in a crash is found.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .. import keys
from ..offsets import entry_id_to_offset
from . import metrics, patterns
from .state import TAKEOVER_MS, new_wake_id, now_ms, text

if TYPE_CHECKING:
    from .core import Subscriptions

log = logging.getLogger("dsgw.subscriptions")

QUEUE_VISIBILITY_MS = 10_000
# Shortest pause between two idle rounds over the shards (right after work).
MIN_PAUSE_S = 0.02
QUEUE_BATCH = 100
TIMER_BATCH = 100


class Dispatcher:
    def __init__(self, subs: Subscriptions, poll_s: float, sweep_s: float) -> None:
        self.subs = subs
        self.state = subs.state
        self.poll_s = poll_s
        self.sweep_s = sweep_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._forever(self.drain_queues, self.poll_s, backoff=True)),
            asyncio.create_task(self._forever(self.serve_timers, self.poll_s)),
            asyncio.create_task(self._forever(self.sweep, self.sweep_s)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _forever(self, step: Any, pause_s: float, backoff: bool = False) -> None:
        """Run `step` again at once while it finds work; otherwise pause. With
        `backoff` the pause starts short after work and doubles up to `pause_s`
        while idle: quick after activity, few round trips when quiet."""
        pause = MIN_PAUSE_S if backoff else pause_s
        while True:
            try:
                busy = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a bug: log, go on
                log.warning("subscription task failed: %s: %s", type(exc).__name__, exc)
                busy = False
            if busy:
                pause = MIN_PAUSE_S if backoff else pause_s
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, pause_s)

    # --- the shards' wake queues ----------------------------------------------------------

    async def drain_queues(self) -> bool:
        """One round over every shard; True if there was work (poll again at once)."""
        if not await self.state.execute("EXISTS", keys.SUBSCRIPTIONS, key=keys.SUBSCRIPTIONS):
            return False
        now = now_ms()
        queues = [keys.wake_queue_key(shard) for shard in range(keys.SHARDS)]
        heads = await asyncio.gather(
            *(self.state.execute("ZRANGEBYSCORE", q, "-inf", now, "LIMIT", 0, 1, key=q) for q in queues)
        )
        due = [q for q, head in zip(queues, heads, strict=True) if head]
        await asyncio.gather(*(self.drain_queue(q) for q in due))
        return bool(due)

    async def drain_queue(self, queue: str) -> None:
        taken = await self.state.script(
            "sub_queue_take", [queue], [now_ms(), QUEUE_VISIBILITY_MS, QUEUE_BATCH]
        )
        pairs = [(text(taken[i]), text(taken[i + 1])) for i in range(0, len(taken), 2)]
        await asyncio.gather(*(self.announce(name) for name, _ in pairs))
        done: list[str] = [x for pair in pairs for x in pair]
        if done:
            await self.state.script("sub_queue_done", [queue], done)

    async def announce(self, name: str) -> None:
        """Tell every subscription linked to `name` its tail (the tail is read
        after the queue entry was claimed: an append after that re-queues)."""
        sk = keys.stream_keys(name)
        tail_raw, members = await asyncio.gather(
            self.state.execute("HGET", sk.meta, "tail", key=sk.meta),
            self.state.execute("SMEMBERS", sk.subs, key=sk.subs),
        )
        if tail_raw is None:
            return  # removed since: nothing to announce
        tail = entry_id_to_offset(tail_raw)
        await asyncio.gather(*(self.notify(text(m), name, tail) for m in members))

    async def notify(self, sub_id: str, name: str, tail: str) -> None:
        reply = await self.state.sub("sub_notify", sub_id, [new_wake_id(), TAKEOVER_MS, name, tail])
        if reply[0] == "unlinked":
            pattern, wake_stream = reply[1], reply[2]
            if pattern and name != wake_stream and patterns.glob_match(pattern, name):
                # Linked at creation (create.lua), first heard of now: before its first entry.
                await self.state.link(sub_id, "g", [name], start_new_at="-1")
                reply = await self.state.sub("sub_notify", sub_id, [new_wake_id(), TAKEOVER_MS, name, tail])
            else:
                await self.state.stream_unlink(name, sub_id)
                return
        if reply[0] == "gone":
            await self.state.stream_unlink(name, sub_id)
            return
        self.subs.after_transition(sub_id, reply, 5 if reply[0] == "woke" else 1)

    # --- timers and the recovery sweep ------------------------------------------------------

    async def serve_timers(self) -> bool:
        ids, claimed = await self.state.take_timers(TIMER_BATCH)
        await asyncio.gather(*(self.tick(sub_id, claimed) for sub_id in ids))
        return len(ids) == TIMER_BATCH

    async def tick(self, sub_id: str, claimed: int | None = None) -> None:
        """Expire, take over or retry what is due. `claimed`: the score the
        timer loop claimed the entry with (None from the sweep)."""
        reply = await self.state.sub("sub_tick", sub_id, [new_wake_id(), TAKEOVER_MS])
        if reply[0] == "gone":
            await self.state.execute("ZREM", keys.SUB_TIMERS, sub_id, key=keys.SUB_TIMERS)
            return
        if reply[-1] == "1":
            metrics.LEASE_EXPIRIES.inc()
        due = reply[5] if reply[0] == "deliver" else reply[1]
        if due:
            await self.state.arm(sub_id, due)
        elif claimed is not None:
            await self.state.disarm(sub_id, claimed)
        if reply[0] == "deliver":
            self.subs.spawn(self.subs.deliver(sub_id, int(reply[1]), reply[2], reply[3]))

    async def sweep(self) -> bool:
        ids = await self.state.ids()
        for i in range(0, len(ids), 100):
            await asyncio.gather(*(self.tick(sub_id) for sub_id in ids[i : i + 100]))
        metrics.SUBSCRIPTIONS.set(len(ids))
        queues = [keys.wake_queue_key(shard) for shard in range(keys.SHARDS)]
        sizes = await asyncio.gather(*(self.state.execute("ZCARD", q, key=q) for q in queues))
        metrics.PENDING_WAKES.set(sum(sizes))
        return False
