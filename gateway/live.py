"""Per-process live fan-out: one Redis pub/sub connection for the whole process,
one subscription per stream that has live readers here, and any number of local
long-poll and SSE readers waiting on it without a Redis connection of their own.

Every write script publishes the new tail on the stream's channel. A reader
takes a `Watch` *before* it reads, so a notification that arrives between its
read and its wait is not lost (the watch's version has moved on). Readers also
re-read after `recheck_s` without any notification, and every reader is woken
when the subscription connection is re-established, so a lost notification
delays a message, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from .metrics import LIVE_SUBSCRIPTION_UP

log = logging.getLogger("dsgw.live")

IDLE_UNSUBSCRIBE_S = 30.0  # keep a quiet subscription a while: readers come back


@dataclass
class _Channel:
    version: int = 0
    notified_at: float = 0.0
    readers: int = 0
    idle_since: float = 0.0
    # One future per waiting reader, resolved by the next notification.
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    # Called with the new version on every notification (gateway/sse_fanout.py).
    listeners: dict[Any, Callable[[Any, int], None]] = field(default_factory=dict)
    # What the latest notification carried after the tail (an append's data,
    # see gateway/lua/append.lua), or None.
    pushed: bytes | None = None
    # Readers resting (Watch.rest): not woken by notifications, only by wake_all.
    resting: set[asyncio.Future[None]] = field(default_factory=set)

    def bump(self, pushed: bytes | None = None) -> None:
        self.notified_at = time.monotonic()
        self.version += 1
        self.pushed = pushed
        waiters, self.waiters = self.waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for key, listener in list(self.listeners.items()):
            listener(key, self.version)

    def wake_everyone(self) -> None:
        self.bump()
        for waiter in list(self.resting):
            _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Watch:
    """A reader's interest in one channel; `wait` returns once it changed, or
    once `interrupt` was called (the client went away, or was cut off)."""

    def __init__(self, channel: _Channel, recheck_s: float) -> None:
        self._channel = channel
        self._seen = channel.version
        self._recheck_s = recheck_s
        self._waiter: asyncio.Future[None] | None = None
        self.interrupted = False

    async def subscribed(self) -> None:
        """Wait until Redis confirmed the channel's subscription: a read made
        after this misses no notification. Bounded (1 s): the recheck interval
        covers a lost one anyway. Readers send what they already have first
        and call this before the read that must not miss anything."""
        if not self._channel.confirmed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._channel.confirmed.wait(), 1.0)
        # The caller reads next: that read covers every notification so far
        # (the confirmation's own wake-up included).
        self._seen = self._channel.version

    @property
    def pending(self) -> bool:
        """A notification came after the last one this watch took into account."""
        return self._channel.version != self._seen

    def pushed_since(self, version: int) -> bytes | None:
        """The data of the one notification that came after `version`, if
        exactly one came and it carried data."""
        channel = self._channel
        return channel.pushed if channel.version == version + 1 else None

    def seen_all(self) -> None:
        """The caller reads next: that read covers every notification so far."""
        self._seen = self._channel.version

    def listen(self, key: Any, listener: Callable[[Any, int], None]) -> None:
        """Call `listener(key, version)` on every notification of the channel."""
        self._channel.listeners[key] = listener

    def unlisten(self, key: Any) -> None:
        self._channel.listeners.pop(key, None)

    async def rest(self, waiter: asyncio.Future[None], timeout_s: float) -> None:
        """Wait for `waiter` (resolved by whoever parked this reader), for
        `interrupt`, for LiveHub.wake_all or for the timeout; notifications
        do not end a rest."""
        if self.interrupted:
            return
        channel = self._channel
        self._waiter = waiter
        channel.resting.add(waiter)
        timer = asyncio.get_running_loop().call_later(max(0.0, timeout_s), _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            channel.resting.discard(waiter)
            self._waiter = None

    def interrupt(self) -> None:
        self.interrupted = True
        if self._waiter is not None:
            _wake(self._waiter)

    @property
    def version(self) -> int:
        """The latest notification this watch has taken into account."""
        return self._seen

    @property
    def notified_at(self) -> float:
        """monotonic() time of the channel's latest notification."""
        return self._channel.notified_at

    async def wait(self, timeout_s: float) -> bool:
        """Wait for a notification newer than the last wait; False on timeout
        (or after the recheck interval, when the caller should re-read anyway)."""
        channel = self._channel
        if channel.version == self._seen and not self.interrupted:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            channel.waiters.add(waiter)
            timer = loop.call_later(max(0.0, min(timeout_s, self._recheck_s)), _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                channel.waiters.discard(waiter)
                self._waiter = None
        changed = channel.version != self._seen
        self._seen = channel.version
        return changed


class LiveHub:
    def __init__(self, redis: Redis, *, recheck_s: float = 5.0, sharded: bool = False) -> None:
        self._redis = redis
        self._recheck_s = recheck_s
        self._sharded = sharded
        # A cluster client keeps one pub/sub connection per node that owns a
        # subscribed shard channel (redis-py's ClusterPubSub), re-routing them
        # when slots move.
        self._cluster = isinstance(redis, RedisCluster)
        self._channels: dict[str, _Channel] = {}
        self._pubsub: PubSub | None = None
        # Cluster + sharded: one reader task per node connection of the ClusterPubSub.
        self._node_tasks: dict[str, asyncio.Task[None]] = {}
        # Cluster: channels whose master could not be reached (retried).
        self._unsubscribed: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self.notifications = 0

    @property
    def ready(self) -> bool:
        """The subscription connection is up (checked by /readyz)."""
        return self._ready

    @property
    def reader_count(self) -> int:
        return sum(c.readers for c in self._channels.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dsgw-live-hub")

    def wake_all(self) -> None:
        for channel in self._channels.values():
            channel.wake_everyone()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in self._channels.values():
            channel.wake_everyone()
        await self._close_pubsub()

    @contextlib.asynccontextmanager
    async def watch(self, name: str) -> AsyncIterator[Watch]:
        channel = self._channels.get(name)
        # Count the reader before any await, so the idle sweep cannot take the
        # channel away while its subscription is still being set up.
        if channel is None:
            channel = self._channels[name] = _Channel(readers=1)
            await self._subscribe(name)
        else:
            channel.readers += 1
        try:
            yield Watch(channel, self._recheck_s)
        finally:
            channel.readers -= 1
            if channel.readers == 0:
                channel.idle_since = time.monotonic()

    async def _subscribe(self, *names: str, reconnecting: bool = False) -> None:
        if self._pubsub is None or not names:
            return
        if self._cluster and self._sharded:
            await self._subscribe_per_node(names)
            return
        try:
            if self._sharded:
                await self._pubsub.ssubscribe(*names)
            else:
                await self._pubsub.subscribe(*names)
        except Exception as exc:
            if reconnecting:
                raise  # the run loop starts over
            # A new watch: the run loop notices a broken connection and resubscribes.
            log.warning("subscribe failed: %s", exc)

    async def _subscribe_per_node(self, names: tuple[str, ...] | list[str]) -> None:
        """Cluster: subscribe channel by channel, so that an unreachable master
        leaves only its own shards' channels unsubscribed (retried every
        second by the pump; their readers re-read every recheck interval
        meanwhile) instead of taking every channel, and readiness, down."""
        assert self._pubsub is not None
        for name in names:
            try:
                await self._pubsub.ssubscribe(name)
                self._unsubscribed.discard(name)
            except Exception as exc:
                if name not in self._unsubscribed:
                    log.warning("subscribe failed, retrying: %s: %s", name, exc)
                self._unsubscribed.add(name)
        self._start_node_readers()

    def _start_node_readers(self) -> None:
        """Read every node's sharded subscriptions concurrently. (redis-py's
        get_sharded_message polls one node per call, so a quiet node would
        hold up the messages of the others for its whole timeout.)"""
        mapping = getattr(self._pubsub, "node_pubsub_mapping", {})
        for node_name, node_pubsub in list(mapping.items()):
            task = self._node_tasks.get(node_name)
            if task is None or task.done():
                self._node_tasks[node_name] = asyncio.create_task(self._pump_node(node_pubsub))

    async def _pump_node(self, node_pubsub: PubSub) -> None:
        while True:
            message = await node_pubsub.get_message(timeout=1.0)
            if message is not None:
                self._dispatch(message)

    async def _recover_failed_nodes(self) -> None:
        mapping = getattr(self._pubsub, "node_pubsub_mapping", {})
        for node_name, task in list(self._node_tasks.items()):
            if not task.done() or task.cancelled() or task.exception() is None:
                continue
            log.warning("live subscription to %s lost: %s", node_name, task.exception())
            del self._node_tasks[node_name]
            node_pubsub = mapping.pop(node_name, None)
            if node_pubsub is not None:
                with contextlib.suppress(Exception):
                    await node_pubsub.aclose()
            # Which channels lived there is the client's business: subscribe all
            # again (a no-op on healthy nodes); everyone re-reads once.
            self._unsubscribed.update(self._channels)
            for channel in self._channels.values():
                channel.bump()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._ready = False
        LIVE_SUBSCRIPTION_UP.set(0)
        for task in self._node_tasks.values():
            task.cancel()
        self._node_tasks.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._connect()
                backoff = 0.1
                await self._pump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("live subscription lost: %s", exc)
                await self._close_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _connect(self) -> None:
        self._pubsub = pubsub = self._redis.pubsub()
        for channel in self._channels.values():
            channel.confirmed.clear()
        if not (self._cluster and self._sharded):
            # A placeholder subscription keeps the connection in pub/sub mode
            # (and its liveness visible to PING) even when no stream has readers.
            # Sharded subscriptions on a cluster open per-node connections as needed.
            await pubsub.subscribe("ds:__hub__")
        await self._subscribe(*self._channels, reconnecting=True)
        self._ready = True
        LIVE_SUBSCRIPTION_UP.set(1)
        # Whatever was published while we were away: every reader re-reads.
        for channel in self._channels.values():
            channel.bump()

    async def _pump(self) -> None:
        assert self._pubsub is not None
        last_sweep = last_ping = time.monotonic()
        while True:
            started = time.monotonic()
            if self._cluster and self._sharded:
                # Node readers do the reading; here: replace a failed one (its
                # master went away: only that node's channels are resubscribed)
                # and retry channels whose master was unreachable.
                await self._recover_failed_nodes()
                if self._unsubscribed:
                    await self._subscribe_per_node(sorted(self._unsubscribed))
                self._start_node_readers()
                await asyncio.sleep(1.0)
                message = None
            else:
                message = await self._pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                self._dispatch(message)
            elif now - started < 0.01:
                # Nothing subscribed yet: get_message does not block then.
                await asyncio.sleep(0.1)
            if now - last_sweep > 5.0:
                last_sweep = now
                await self._unsubscribe_idle(now)
            if now - last_ping > 5.0 and not self._cluster:
                last_ping = now
                await self._pubsub.ping()

    def _dispatch(self, message: dict) -> None:
        kind = message["type"]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        name = message.get("channel")
        if name is None:
            return
        name = name.decode() if isinstance(name, bytes) else name
        channel = self._channels.get(name)
        if channel is None:
            return
        if kind in ("message", "smessage"):
            self.notifications += 1
            data = message.get("data")
            channel.bump(data if isinstance(data, bytes) and b"\n" in data else None)
        elif kind in ("subscribe", "ssubscribe"):
            # From now on no append on this stream goes unnoticed; one made while
            # the subscription was being (re)established is caught by a re-read.
            channel.confirmed.set()
            channel.bump()

    async def _unsubscribe_idle(self, now: float) -> None:
        idle = [
            name
            for name, c in self._channels.items()
            if c.readers == 0 and now - c.idle_since > IDLE_UNSUBSCRIBE_S
        ]
        if not idle or self._pubsub is None:
            return
        for name in idle:
            del self._channels[name]
        if self._sharded:
            await self._pubsub.sunsubscribe(*idle)
        else:
            await self._pubsub.unsubscribe(*idle)
