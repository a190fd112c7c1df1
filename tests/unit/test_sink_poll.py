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
    # The three share the room in this round (a third each), instead of two
    # taking a full batch's budget and the third waiting for the next round.
    assert sorted(shard for shard, _ in full) == [3, 7, 9]
    assert [size for _, size in full] == [512 * KIB // 3] * 3
    assert not [r for r in reads if not p.shards[r[0]].active]  # no room left to probe idle shards


def test_one_active_shard_reads_a_full_batch() -> None:
    p = poller(256 * KIB, 512 * KIB)
    p.shards[3].active = True
    reads = p._due_reads(now=0.0)
    assert [size for shard, _, size, _ in reads if shard == 3] == [256 * KIB]


def test_probes_share_the_budget_and_the_shards_left_out_go_next() -> None:
    p = poller(64 * KIB, 10 * PROBE_BYTES)
    first = [shard for shard, *_ in p._due_reads(now=0.0)]
    assert len(first) == 10 and p.inflight == 10 * PROBE_BYTES
    p.inflight = 0
    # The first ten wait for their replies (not due again until then); the
    # shards that found no room are due at once.
    second = [shard for shard, *_ in p._due_reads(now=0.0)]
    assert len(second) == 10 and not set(second) & set(first)


def test_a_round_looks_only_at_due_shards_and_a_read_schedules_the_next() -> None:
    p = poller(64 * KIB, 2048 * PROBE_BYTES)
    assert len(p._due_reads(now=0.0)) == SHARDS  # at start every shard is due
    assert p._due_reads(now=0.0) == []  # all waiting for their replies
    p.shards[7].idle_s = 0.4
    p._after_read(7, PROBE_BYTES, False, [], now=1.0)  # found empty again: back off 0.8 s
    # Due at 1.8 s, readable a quarter of the back-off early (with idle shards due then).
    assert p._due_reads(now=1.5) == []
    assert [shard for shard, *_ in p._due_reads(now=1.6)] == [7]


def test_a_big_entry_waits_for_the_bytes_in_flight_then_goes_alone() -> None:
    p = poller(64 * KIB, 128 * KIB)
    p._set_big(5, 300 * KIB)  # TOOBIG: bigger than the whole budget
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
