"""Scenario 2: under a steady load of appends, the sink is SIGKILLed while it
holds a batch (delivered, not yet acknowledged), twice, and Postgres is
stopped for 10 s. Afterwards `session_events` equals the streams' messages:
same messages, same order, no duplicates, no gaps."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import redis

from e2e import stack as stack_module
from e2e.chaos.tools import JSON, Producer, client, new_name, read_all, running_stack, summarize, until
from gateway.keys import SHARDS, feed_key
from workers.sink import GROUP

STREAMS = 8
PRODUCERS_PER_STREAM = 2
PAUSE_S = 0.02
# A killed sink's batch is taken over by its successor (a new consumer name)
# once it sat this long unacknowledged.
ENV = {"DSGW_SINK_CLAIM_IDLE_MS": "2000"}


def pending_entries(redis_url: str, sink_pid: int) -> int:
    """Feed entries delivered to the sink process `sink_pid` and not
    acknowledged yet, all shards (its consumer name ends in its pid)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        total = 0
        for shard in range(SHARDS):
            try:
                consumers = r.xpending(feed_key(shard), GROUP)["consumers"]
            except redis.ResponseError:  # no group on this shard yet
                continue
            total += sum(int(c["pending"]) for c in consumers if c["name"].endswith(f"-{sink_pid}"))
        return total
    finally:
        r.close()


async def test_sink_killed_mid_batch_twice_and_postgres_down_10s():
    started = time.monotonic()
    with running_stack(env=ENV) as stack:
        names = [new_name(f"sink-{k}") for k in range(STREAMS)]
        urls = [f"{stack.base_url}/v1/stream/{name}" for name in names]
        async with client() as http:
            for url in urls:
                assert (await http.put(url, headers=JSON)).status_code == 201
        producers = [
            Producer(f"p-{k}-{j}", url) for k, url in enumerate(urls) for j in range(PRODUCERS_PER_STREAM)
        ]
        stop = asyncio.Event()
        load = asyncio.gather(*(p.run(1_000_000, PAUSE_S, stop) for p in producers))

        def acked() -> int:
            return sum(len(p.acked) for p in producers)

        events = []
        kills = mid_batch = 0
        while mid_batch < 2:
            assert kills < 10, "the sink never held a batch when killed"
            await asyncio.sleep(2)
            sink = stack.find("sink")[0]
            await until(lambda s=sink: pending_entries(stack.redis_url, s.pid) > 0, 10, every_s=0.005)
            stack_module.stop_proc(sink, signal.SIGKILL)
            kills += 1
            # What the dead sink held: delivered to it, never acknowledged.
            held = pending_entries(stack.redis_url, sink.pid)
            mid_batch += held > 0
            await asyncio.to_thread(stack_module.restart, stack, sink)
            events.append(f"sink SIGKILLed holding {held} unacknowledged feed entries at {acked()} appends")
        await asyncio.sleep(3)
        before = acked()
        pg = stack.find("postgres")[0]
        down_started = time.monotonic()
        await asyncio.to_thread(stack_module.restart, stack, pg, signal.SIGINT, 10.0)
        events.append(
            f"Postgres down {time.monotonic() - down_started:.1f} s (stop, 10 s, start); "
            f"{acked() - before} appends acknowledged meanwhile"
        )
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(load, 120)
        total = acked()

        conn = await asyncpg.connect(stack.database_url)
        try:

            async def synced() -> int:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM session_events WHERE stream_name = ANY($1::text[])", names
                    )
                )

            catch_up = time.monotonic()
            deadline = catch_up + 120
            while await synced() < total and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            catch_up_s = time.monotonic() - catch_up
            await asyncio.sleep(2)  # anything beyond the count would show up now
            rows = await conn.fetch(
                "SELECT stream_name, payload->>'p' AS p, (payload->>'i')::int AS i FROM session_events"
                " WHERE stream_name = ANY($1::text[]) ORDER BY stream_name, ds_offset",
                names,
            )
        finally:
            await conn.close()
        async with client() as http:
            stored = {name: await read_all(http, url) for name, url in zip(names, urls, strict=True)}

        in_streams = sum(len(v) for v in stored.values())
        keys = [(r["stream_name"], r["p"], r["i"]) for r in rows]
        duplicates = len(keys) - len(set(keys))
        stream_keys = {(name, m["p"], m["i"]) for name, messages in stored.items() for m in messages}
        missing = len(stream_keys - set(keys))
        extra = len(set(keys) - stream_keys)
        same_order = all(
            [(r["p"], r["i"]) for r in rows if r["stream_name"] == name] == [(m["p"], m["i"]) for m in msgs]
            for name, msgs in stored.items()
        )
        for event in events:
            print(f"  {event}")
        print(f"  producers: {summarize(producers)}")
        print(f"  streams hold {in_streams} messages; session_events holds {len(rows)} rows for them "
              f"(caught up {catch_up_s:.1f} s after the load ended): {missing} missing, {duplicates} duplicated, "
              f"{extra} not in a stream, same order: {same_order}")  # fmt: skip
        print(f"  scenario 2 took {time.monotonic() - started:.0f} s")
        assert in_streams == total and all(not p.refused for p in producers)
        assert (len(rows), missing, duplicates, extra, same_order) == (in_streams, 0, 0, 0, True)
