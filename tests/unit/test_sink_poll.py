"""The sink poller's read planning (workers/sink_poll.py), pure logic: every
read's bytes are reserved from the in-flight budget before it is sent, a big
entry waiting for room goes first and alone, and shards with entries are
read before idle ones."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.keys import SHARDS
from workers.settings import WorkerSettings
from workers.sink_poll import PROBE_BYTES, Batch, ShardPoller

KIB = 1024


def poller(batch_bytes: int, inflight_bytes: int) -> ShardPoller:
    settings = WorkerSettings(sink_batch_bytes=batch_bytes, sink_inflight_bytes=inflight_bytes)
    redis: Any = None  # planning sends nothing
    return ShardPoller(settings, redis, "c1", asyncio.Event())


def test_reads_of_a_round_never_reserve_more_than_the_budget() -> None:
    p = poller(256 * KIB, 512 * KIB)
    for shard in (3, 7, 9):
        p.shards[shard].active = True  # had entries: each wants a full batch
    reads = p._due_reads(now=0.0)
    assert p.inflight == sum(size for _, _, size, _ in reads) <= 512 * KIB
    full = [(shard, size) for shard, _, size, _ in reads if p.shards[shard].active]
    assert [size for _, size in full] == [256 * KIB, 256 * KIB]  # the third waits for room
    assert not [r for r in reads if not p.shards[r[0]].active]  # no room left to probe idle shards


def test_probes_share_the_budget_and_a_round_starts_at_a_rotating_shard() -> None:
    p = poller(64 * KIB, 10 * PROBE_BYTES)
    first = [shard for shard, *_ in p._due_reads(now=0.0)]
    assert len(first) == 10 and p.inflight == 10 * PROBE_BYTES
    p.inflight = 0
    second = [shard for shard, *_ in p._due_reads(now=0.0)]
    assert second != first and len(second) == 10


def test_a_big_entry_waits_for_the_bytes_in_flight_then_goes_alone() -> None:
    p = poller(64 * KIB, 128 * KIB)
    p.shards[5].big = 300 * KIB  # TOOBIG: bigger than the whole budget
    p.inflight = 10 * KIB  # a batch being written
    assert p._due_reads(now=0.0) == [] and p._blocked()  # nobody overtakes it
    p.inflight = 0
    reads = p._due_reads(now=0.0)
    assert [(shard, size) for shard, _, size, _ in reads] == [(5, 300 * KIB)]  # alone
    assert p.peak_inflight == 300 * KIB


def test_written_batches_give_their_bytes_back() -> None:
    p = poller(64 * KIB, 128 * KIB)
    p.shards[2].busy = True
    p.inflight = 40 * KIB
    p.written(Batch(2, p.shards[2].key, [], 40 * KIB), lag_s=2.0)
    assert p.inflight == 0 and not p.shards[2].busy and p.shards[2].lag_s == 2.0
    assert len(p.shards) == SHARDS
