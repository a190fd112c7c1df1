"""The background work of subscriptions, one set of tasks per gateway process
(never one per shard):

- the dispatcher drains the shards' wake queues (`dswake:{tag}`, filled by
  append.lua / create.lua atomically with the append) and tells each linked
  subscription the stream's new tail (sub_notify.lua), issuing wakes. The
  scripts also publish on the shard's wake channel (keys.wake_channel); the
  process's LiveHub calls back here and the dispatcher polls that shard at
  once, again while it finds work. Quiet shards cost nothing: the round over
  every queue runs only every DSGW_SUBSCRIPTIONS_FULL_POLL_MS (while any
  subscription exists, by the one replica that takes SUB_FULL_POLL_LEASE),
  for notifications lost with a dispatcher that died mid-way; a replica whose
  pub/sub connection was down makes its own round when it is back (the hub
  bumps every channel then), and so does every replica at start.
  A queue entry is claimed by re-scoring and removed only after every
  subscription heard of it, so a dispatcher that dies loses nothing: the entry
  falls due again after QUEUE_VISIBILITY_MS and the full round finds it.
- the timer loop serves `dssubs:timers` (leases running out, deliveries to
  retry or to take over from a replica that died), any replica for any
  subscription.
- the recovery sweep, at start and every DSGW_SUBSCRIPTIONS_SWEEP_S, ticks
  every subscription, so work whose timer entry was lost in a crash is found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .. import keys
from ..offsets import entry_id_to_offset
from . import metrics, patterns
from .state import TAKEOVER_MS, new_wake_id, now_ms, text

if TYPE_CHECKING:
    from .core import Subscriptions

log = logging.getLogger("dsgw.subscriptions")

QUEUE_VISIBILITY_MS = 10_000
# Pause after a failed round (Redis away) before the shards are tried again.
RETRY_PAUSE_S = 0.5
QUEUE_BATCH = 100
TIMER_BATCH = 100


class Dispatcher:
    def __init__(self, subs: Subscriptions, poll_s: float, sweep_s: float) -> None:
        self.subs = subs
        self.state = subs.state
        self.poll_s = poll_s
        self.sweep_s = sweep_s
        self.full_poll_s = max(0.1, subs.settings.subscriptions_full_poll_ms / 1000)
        # Shards whose wake channel spoke since their last poll, and the signal for them.
        self._notified: set[int] = set()
        self._heard = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.drain_forever()),
            asyncio.create_task(self._forever(self.serve_timers, self.poll_s)),
            asyncio.create_task(self._forever(self.sweep, self.sweep_s)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _forever(self, step: Any, pause_s: float) -> None:
        """Run `step` again at once while it finds work; otherwise pause."""
        while True:
            try:
                busy = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a bug: log, go on
                log.warning("subscription task failed: %s: %s", type(exc).__name__, exc)
                busy = False
            if not busy:
                await asyncio.sleep(pause_s)

    # --- the shards' wake queues ----------------------------------------------------------

    def _on_wake(self, shard: int, _version: int) -> None:
        # Called by the LiveHub inside its reader: no await, no task.
        self._notified.add(shard)
        self._heard.set()

    async def drain_forever(self) -> None:
        """Listen to every shard's wake channel (one pub/sub subscription each,
        on the hub's connection) and poll the shards they name; every queue
        every `full_poll_s`."""
        hub = self.subs.gw.hub
        async with contextlib.AsyncExitStack() as stack:
            for shard in range(keys.SHARDS):
                watch = await stack.enter_async_context(hub.watch(keys.wake_channel(shard)))
                watch.listen(shard, self._on_wake)
            await self._drain_loop()

    async def _drain_loop(self) -> None:
        full_due = 0.0  # a round over every queue at start
        while True:
            now = time.monotonic()
            if now >= full_due:
                first, full_due = full_due == 0.0, now + self.full_poll_s
                if not (first or await self._take_full_poll_lease()):
                    continue
                shards = list(range(keys.SHARDS))
                self._notified.clear()
            elif self._notified:
                shards, self._notified = sorted(self._notified), set()
            else:
                self._heard.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heard.wait(), full_due - now)
                continue
            try:
                busy = await self.drain_shards(shards)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, a bug: try these shards again shortly
                log.warning("subscription task failed: %s: %s", type(exc).__name__, exc)
                self._notified.update(shards)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            # Shards that had due entries are polled again at once (a batch may
            # have left more); the round ends when a poll finds nothing due.
            self._notified.update(busy)

    async def _take_full_poll_lease(self) -> bool:
        """One replica per interval makes the round over every queue (the
        queues are shared: one round finds a lost wake for all of them)."""
        lease_ms = max(1, int(self.full_poll_s * 1000 * 0.9))
        key = keys.SUB_FULL_POLL_LEASE
        try:
            return bool(await self.state.execute("SET", key, os.getpid(), "NX", "PX", lease_ms, key=key))
        except Exception as exc:  # Redis away: the next interval tries again
            log.warning("subscription task failed: %s: %s", type(exc).__name__, exc)
            return False

    async def drain_shards(self, shards: list[int]) -> list[int]:
        """Drain the due entries of `shards`' queues; the shards that had any.
        A round over every shard (the safety net, and the hub's bump of every
        channel after a reconnect) runs only while a subscription exists, and
        samples the queues' sizes for the metric."""
        full = len(shards) == keys.SHARDS
        if full and not await self.state.execute("EXISTS", keys.SUBSCRIPTIONS, key=keys.SUBSCRIPTIONS):
            return []
        queues = [keys.wake_queue_key(shard) for shard in shards]
        if full:
            # Idle queues are empty: one ZCARD each, and a look at the head only where it is not.
            sizes = await asyncio.gather(*(self.state.execute("ZCARD", q, key=q) for q in queues))
            metrics.PENDING_WAKES.set(sum(sizes))
            shards = [shard for shard, size in zip(shards, sizes, strict=True) if size]
            queues = [keys.wake_queue_key(shard) for shard in shards]
        now = now_ms()
        heads = await asyncio.gather(
            *(self.state.execute("ZRANGEBYSCORE", q, "-inf", now, "LIMIT", 0, 1, key=q) for q in queues)
        )
        due = [(shard, q) for shard, q, head in zip(shards, queues, heads, strict=True) if head]
        await asyncio.gather(*(self.drain_queue(q) for _, q in due))
        return [shard for shard, _ in due]

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
        return False  # (the wake queues' sizes are sampled by the full round over them)
