"""The sink's poller: which shard feeds to read, when, and how much.

One task reads the feeds of every due shard in one pipelined round
(redis-py pipelines: one connection per Redis node), never blocking. A shard
found empty is read again after a back-off that doubles from IDLE_FIRST_S up
to DSGW_SINK_BLOCK_MS (the bound on how late the sink notices the first
append to an idle shard); a shard that had entries is read again as soon as
its batch is written. Batches go to the writers (workers/sink.py) through a
queue; a shard has at most one batch queued or being written.

Memory: every read reserves its byte budget from one in-flight budget
(DSGW_SINK_INFLIGHT_BYTES) before it is sent, and gateway/lua/sink_read.lua
(strict mode) never returns more than that budget; the bytes stay counted
until their batch is written. An entry bigger than any budget it could get
is reported (TOOBIG) without being delivered and read alone once the bytes
in flight leave room for it (or once nothing else is in flight), and the
shards behind it wait meanwhile. So the feed bytes a sink holds never exceed
max(DSGW_SINK_INFLIGHT_BYTES, its largest feed entry).

Health and metrics: per shard, when it last finished a round (/healthz names
the stalled ones) and its lag; Prometheus gets aggregates only (bounded
cardinality whatever the shard count).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge, Histogram
from redis.exceptions import NoScriptError, RedisError

from gateway.keys import SHARDS, feed_key
from gateway.offsets import parse_entry_id
from gateway.redis_client import reset_after
from gateway.scripts import script_source

from .process import Backoff
from .settings import WorkerSettings

log = logging.getLogger("dsgw.sink")

GROUP = "dsgw-sink"
CLAIM_EVERY_S = 5.0
TRIM_EVERY_S = 2.0
SINK_READ = script_source("sink_read")

IDLE_FIRST_S = 0.005  # first back-off of a shard found empty; doubles up to DSGW_SINK_BLOCK_MS
ROUND_S = 0.005  # shortest pause between poll rounds (shards due within it share the round)
POLL_CHUNK = 512  # commands per pipeline
PROBE_ENTRIES = 100  # budget of a read of a shard that was idle
PROBE_BYTES = 16 * 1024  # (1024 idle shards probed at once reserve 16 MiB)

LAG = Histogram(
    "dsgw_sink_lag_seconds",
    "From the append in Redis to the commit in Postgres (every feed entry, all shards)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LAG_MAX = Gauge(
    "dsgw_sink_lag_max_seconds",
    "The largest lag of any shard: its oldest entry at its last commit (0 once it is read empty)",
)
LAGGING = Gauge("dsgw_sink_lagging_shards", "Shards whose last commit was more than 1 s behind the append")
STALLED = Gauge("dsgw_sink_stalled_shards", "Shards that have not finished a round for DSGW_SINK_STALL_MS")
PENDING = Gauge("dsgw_sink_pending_entries", "Feed entries delivered but not yet acknowledged (all shards)")
INFLIGHT = Gauge("dsgw_sink_inflight_bytes", "Feed bytes read (or reserved for a read) and not yet written")
INFLIGHT_PEAK = Gauge(
    "dsgw_sink_inflight_peak_bytes", "The most dsgw_sink_inflight_bytes has been since the sink started"
)
LAGGING_S = 1.0


@dataclass(slots=True)
class FeedEntry:
    id: bytes
    fields: dict[bytes, bytes]

    def record(self) -> tuple[str, str, bytes]:
        """Its row of dsgw_sink_entries (KeyError, UnicodeDecodeError: unreadable)."""
        return self.fields[b"stream"].decode(), self.fields[b"ids"].decode(), self.fields[b"json"]

    @property
    def messages(self) -> int:
        return self.fields[b"ids"].count(b" ") + 1

    @property
    def size(self) -> int:
        """Its bytes as sink_read.lua measures them (ID, field names and values)."""
        return len(self.id) + sum(len(k) + len(v) for k, v in self.fields.items())


def feed_entries(raw: list[Any]) -> list[FeedEntry]:
    """Entries from XREADGROUP (redis-py: (id, dict)) or sink_read.lua (flat field lists)."""
    entries = []
    for entry_id, fields in raw:
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        entries.append(FeedEntry(entry_id, fields))
    return entries


@dataclass(slots=True)
class _ShardState:
    """What the poller knows of one shard's feed."""

    key: str
    due: float = 0.0  # monotonic time of its next read
    idle_s: float = 0.0  # its back-off while idle
    error_s: float = 0.0  # its back-off after a failed batch
    claim_due: float = 0.0  # when to look for stale entries again
    busy: bool = False  # a batch of it is queued or being written
    active: bool = False  # its last read had entries: read a full batch next
    group_ready: bool = False
    # Acknowledged entries since its last trim (at start: maybe, by an earlier sink).
    dirty: bool = True
    big: int = 0  # its next entry's bytes, when no read budget could hold it (TOOBIG)
    lag_s: float = 0.0  # its oldest entry's lag at its last commit
    pending: int = 0  # its entries delivered and not acknowledged, at its last trim
    version: int = 0  # of its entry in the poller's ready heap (older entries are stale)


@dataclass(slots=True)
class Batch:
    """What the poller hands a writer: one shard's entries, and their bytes."""

    shard: int
    key: str
    entries: list[FeedEntry]
    size: int


def _trim_point(groups: list[dict[str, Any]], summary: dict[str, Any] | None) -> tuple[int, int] | None:
    """The MINID below which a feed holds only acknowledged entries."""
    group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
    if group is None:
        return None
    if summary and summary["pending"]:
        min_id = parse_entry_id(summary["min"])
    else:
        last = parse_entry_id(group["last-delivered-id"])
        min_id = (last[0], last[1] + 1)
    return min_id if min_id > (0, 1) else None


class ShardPoller:
    def __init__(
        self, settings: WorkerSettings, redis: aioredis.Redis, consumer: str, stop: asyncio.Event
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.consumer = consumer
        self.stop = stop
        self.shards = [_ShardState(feed_key(shard)) for shard in range(SHARDS)]
        self.batches: asyncio.Queue[Batch | None] = asyncio.Queue()
        # (never below a probe's budget: a sink configured smaller could read nothing)
        self.budget = max(settings.sink_inflight_budget, PROBE_BYTES)
        self.inflight = 0  # bytes read or reserved, not yet written: never above the budget
        self.peak_inflight = 0
        # Per shard: when it last finished a round (a read, with or without
        # entries, and their write). One stuck shard is enough to make the
        # worker unhealthy, whatever the others do.
        self.last_progress = [time.monotonic()] * SHARDS
        self._wake = asyncio.Event()
        self._sink_read_sha = ""
        # (earliest read time, version, shard) of every shard that is not busy:
        # a round looks only at the shards due, not at all of them.
        self._ready: list[tuple[float, int, int]] = []
        for shard in range(SHARDS):
            self._schedule(shard)
        self._big: set[int] = set()  # shards whose next entry is bigger than any read budget
        # Scrape-time aggregates: bounded cardinality, per-shard detail in /healthz.
        LAG_MAX.set_function(lambda: max(s.lag_s for s in self.shards))
        LAGGING.set_function(lambda: sum(1 for s in self.shards if s.lag_s > LAGGING_S))
        STALLED.set_function(lambda: len(self.stalled_shards()))
        INFLIGHT.set_function(lambda: self.inflight)
        INFLIGHT_PEAK.set_function(lambda: self.peak_inflight)

    def stalled_shards(self) -> list[int]:
        limit = (self.settings.sink_stall_ms + self.settings.sink_block_ms) / 1000
        now = time.monotonic()
        return [shard for shard, at in enumerate(self.last_progress) if now - at >= limit]

    def _schedule(self, shard: int) -> None:
        """(Re)enter a shard that is not busy into the ready heap at its due
        time; an idle shard may be read a quarter of its back-off early, so idle
        shards share rounds instead of each costing a round of its own."""
        state = self.shards[shard]
        state.version += 1
        heapq.heappush(self._ready, (state.due - max(ROUND_S, state.idle_s / 4), state.version, shard))

    def _current(self, entry: tuple[float, int, int]) -> bool:
        """A heap entry still stands: its shard was not scheduled again since, nor taken."""
        state = self.shards[entry[2]]
        return entry[1] == state.version and not state.busy

    def _set_big(self, shard: int, size: int) -> None:
        self.shards[shard].big = size
        (self._big.add if size else self._big.discard)(shard)

    # -- what the writers report ---------------------------------------------

    def written(self, batch: Batch, lag_s: float) -> None:
        """Its batch is committed and acknowledged: read the shard again at once."""
        state = self.shards[batch.shard]
        self.last_progress[batch.shard] = time.monotonic()
        state.dirty = True
        state.idle_s = state.due = 0.0
        state.error_s = 0.0
        state.lag_s = lag_s
        self._release(batch)

    def failed(self, batch: Batch) -> None:
        """Not acknowledged: the entries stay pending and are claimed again.
        Back off this shard only; the others go on."""
        state = self.shards[batch.shard]
        state.error_s = min(5.0, max(0.1, state.error_s * 2))
        state.due = time.monotonic() + state.error_s
        state.claim_due = 0.0
        self._release(batch)

    def _release(self, batch: Batch) -> None:
        self.shards[batch.shard].busy = False
        self._schedule(batch.shard)
        self.inflight -= batch.size
        self._wake.set()

    # -- the poll loop --------------------------------------------------------

    async def run(self) -> None:
        """Poll until stop is set; every TRIM_EVERY_S also trim acknowledged entries."""
        backoff = Backoff()
        last_trim = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                await self._poll_round(now)
                if now - last_trim >= TRIM_EVERY_S:
                    last_trim = now
                    await self.trim_acknowledged()
                backoff.reset()
            except (RedisError, OSError) as exc:
                log.warning("sink cannot reach redis: %s: %s", type(exc).__name__, exc)
                await reset_after(self.redis, exc)
                await backoff.wait(self.stop)
                continue
            except Exception:
                # A bug must not end the sink: log it, back off, try again
                # (undelivered entries stay in the feed, delivered ones pending).
                log.exception("sink poll round failed")
                await backoff.wait(self.stop)
                continue
            await self._sleep_until_due()

    def _blocked(self) -> bool:
        """True when no read can start before a writer frees bytes: too little
        room for a probe, or a big entry waiting for room (it goes first)."""
        room = self.budget - self.inflight
        shards = self.shards
        if self.inflight > 0 and any(shards[i].big > room and not shards[i].busy for i in self._big):
            return True
        return room < min(PROBE_BYTES, self._read_budget(False)[1])

    async def _sleep_until_due(self) -> None:
        now = time.monotonic()
        if self._blocked():
            due = now + self.settings.sink_block_ms / 1000  # a writer's wake comes first
        else:
            ready = self._ready
            while ready and not self._current(ready[0]):
                heapq.heappop(ready)
            due = ready[0][0] if ready else now + 1.0
        # At least ROUND_S between rounds, so shards falling due one by one
        # share a round (one pipeline) instead of one round trip each.
        delay = min(max(due - now, ROUND_S), self.settings.sink_block_ms / 1000)
        self._wake.clear()
        stop = asyncio.ensure_future(self.stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait([stop, wake], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        wake.cancel()

    def _due_reads(self, now: float) -> list[tuple[int, int, int, bool]]:
        """(shard, entries, bytes, claim) for every shard to read this round,
        each read's bytes reserved from the in-flight budget before it is sent.
        Shards waiting with a big entry go first, then shards that had
        entries, then idle ones; a big entry that does not fit yet stops the
        round, so the bytes freed by the writers go to it."""
        due = []
        ready = self._ready
        while ready and ready[0][0] <= now:
            entry = heapq.heappop(ready)
            if self._current(entry):
                due.append(entry[2])
        due.sort(key=lambda shard: (not self.shards[shard].big, not self.shards[shard].active))
        reads = []
        # Shards that had entries share the room: with many of them (many
        # shards, a few entries each) one round reads them all, instead of the
        # first two reserving the whole budget and the rest waiting a round each.
        active = sum(1 for shard in due if self.shards[shard].active)
        share = max(PROBE_BYTES, (self.budget - self.inflight) // max(1, active))
        full, probe = self._read_budget(True), self._read_budget(False)
        for shard in due:
            state = self.shards[shard]
            room = self.budget - self.inflight
            entries, size = full if state.active else probe
            if state.active:
                size = min(size, share)
            if state.big:
                if state.big > room and self.inflight > 0:
                    break  # alone if it must: wait until the bytes in flight are written
                size = max(state.big, min(size, room))
            else:
                size = min(size, room)
                if size < min(PROBE_BYTES, probe[1]):
                    continue
            self.inflight += size
            reads.append((shard, entries, size, now >= state.claim_due))
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        taken = {shard for shard, *_ in reads}
        for shard in due:
            if shard not in taken:
                self._schedule(shard)  # no room this round: due again at once
        return reads

    def _read_budget(self, full: bool) -> tuple[int, int]:
        """(entries, bytes) of a read: a shard seen idle is probed with a small
        budget, so a round over many shards holds little at once."""
        entries, size = max(1, self.settings.sink_batch), max(1, self.settings.sink_batch_bytes)
        return (entries, size) if full else (min(entries, PROBE_ENTRIES), min(size, PROBE_BYTES))

    async def _poll_round(self, now: float) -> None:
        reads = self._due_reads(now)
        if not reads:
            return
        try:
            await self._ensure_groups([shard for shard, *_ in reads if not self.shards[shard].group_ready])
            if not self._sink_read_sha:
                self._sink_read_sha = await self.redis.script_load(SINK_READ)
            replies = await self._pipelined(
                [
                    (
                        "EVALSHA", self._sink_read_sha, 1, self.shards[shard].key, GROUP, self.consumer,
                        entries, size, self.settings.sink_claim_idle_ms if claim else "", "strict",
                    )
                    for shard, entries, size, claim in reads
                ]
            )  # fmt: skip
        except BaseException:
            self.inflight -= sum(size for _, _, size, _ in reads)  # nothing was read
            for shard, *_ in reads:
                self._schedule(shard)
            raise
        for (shard, _entries, size, claim), reply in zip(reads, replies, strict=True):
            self._after_read(shard, size, claim, reply, now)

    def _after_read(self, shard: int, reserved: int, claim: bool, reply: Any, now: float) -> None:
        try:
            self._handle_read(shard, reserved, claim, reply, now)
        finally:
            if not self.shards[shard].busy:
                self._schedule(shard)  # read again at its (new) due time

    def _handle_read(self, shard: int, reserved: int, claim: bool, reply: Any, now: float) -> None:
        state = self.shards[shard]
        self.inflight -= reserved  # the reservation becomes the batch's actual bytes, or nothing
        if isinstance(reply, Exception):
            if isinstance(reply, NoScriptError):
                self._sink_read_sha = ""  # the node restarted or failed over: load it again
            elif str(reply).startswith("TOOBIG"):
                self._set_big(shard, int(str(reply).split()[1]))  # read it alone, with a budget that fits it
            elif "NOGROUP" in str(reply):
                state.group_ready = False  # the feed key was deleted: recreate the group
            else:
                log.warning("sink read of %s failed: %s: %s", state.key, type(reply).__name__, reply)
                state.due = now + 1.0
            return
        entries = feed_entries(reply or [])
        if claim:
            # Claim again next round while stale entries turn up, else in CLAIM_EVERY_S.
            state.claim_due = now if entries else now + CLAIM_EVERY_S
            if entries:
                log.info(
                    "claimed stale entries", extra={"fields": {"feed": state.key, "count": len(entries)}}
                )
        if entries:
            self._set_big(shard, 0)
            state.busy = state.active = True
            size = sum(entry.size for entry in entries)
            self.inflight += size
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            self.batches.put_nowait(Batch(shard, state.key, entries, size))
        elif not claim:
            state.active = False
            self._set_big(shard, 0)
            state.lag_s = 0.0
            state.idle_s = min(self.settings.sink_block_ms / 1000, max(IDLE_FIRST_S, state.idle_s * 2))
            state.due = now + state.idle_s
            self.last_progress[shard] = now

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies (or exceptions) of `commands`, sent POLL_CHUNK at a time
        through one pipeline (a cluster pipeline: one connection per node)."""
        replies: list[Any] = []
        for start in range(0, len(commands), POLL_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for command in commands[start : start + POLL_CHUNK]:
                pipe.execute_command(*command)
            replies.extend(await pipe.execute(raise_on_error=False))
        return replies

    async def _ensure_groups(self, shards: list[int]) -> None:
        if not shards:
            return
        keys = [self.shards[shard].key for shard in shards]
        replies = await self._pipelined([("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM") for key in keys])
        for shard, reply in zip(shards, replies, strict=True):
            if not isinstance(reply, Exception) or "BUSYGROUP" in str(reply):
                self.shards[shard].group_ready = True

    async def trim_acknowledged(self) -> None:
        """Drop acknowledged feed entries of the shards that acknowledged any
        since the last trim: everything below the oldest pending entry (or,
        with nothing pending, everything delivered so far)."""
        shards = [shard for shard, state in enumerate(self.shards) if state.dirty]
        if not shards:
            return
        for shard in shards:
            self.shards[shard].dirty = False
        replies: list[Any] = []
        for start in range(0, len(shards), POLL_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for shard in shards[start : start + POLL_CHUNK]:
                pipe.xinfo_groups(self.shards[shard].key)
                pipe.xpending(self.shards[shard].key, GROUP)
            replies.extend(await pipe.execute(raise_on_error=False))
        trims: list[tuple[Any, ...]] = []
        for i, shard in enumerate(shards):
            groups, summary = replies[2 * i], replies[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(summary, Exception):
                continue
            self.shards[shard].pending = summary["pending"] if summary else 0
            min_id = _trim_point(groups, summary)
            if min_id is not None:
                trims.append(("XTRIM", self.shards[shard].key, "MINID", f"{min_id[0]}-{min_id[1]}"))
        PENDING.set(sum(state.pending for state in self.shards))
        if trims:
            await self._pipelined(trims)
