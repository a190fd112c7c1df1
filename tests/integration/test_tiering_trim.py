"""Tiered history, writing side (issue 11), with real Redis, Postgres, gateway
and sink processes: the sink copies every entry of a tiered stream to
stream_history, byte-exact, and Redis is trimmed by retention, only below
what Postgres committed, and only by whole appends."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from gateway.keys import stream_keys, trim_due_key
from gateway.offsets import format_offset, parse_entry_id
from tests.conftest import GatewayProcess, WorkerProcess, start_gateway, start_worker, wait_until
from tests.integration import test_postgres_sync

JSON = {"content-type": "application/json"}
pg = test_postgres_sync.pg  # the fixture: a connection to the migrated Postgres
FAST = {"DSGW_SINK_BLOCK_MS": "200", "DSGW_TRIM_SWEEP_MS": "200"}


@pytest.fixture(scope="module")
def tiered_gateway(redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Retention on: every stream it creates is tiered (the limit itself is the sink's)."""
    gw = start_gateway(redis_server.url, tmp_path_factory.mktemp("tiergw"), DSGW_RETAIN_MESSAGES="1000")
    yield gw
    gw.stop()


@pytest.fixture
def r(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@contextlib.contextmanager
def running_sink(redis_url: str, database_url: str, log_dir: Path, **env: str) -> Iterator[WorkerProcess]:
    sink = start_worker("sink", redis_url, database_url, log_dir, **FAST, **env)
    try:
        yield sink
    finally:
        sink.stop()


def now(check: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A synchronous check as wait_until's predicate."""

    async def predicate() -> Any:
        return check()

    return predicate


def meta(r: redis.Redis, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(stream_keys(name).meta).items()}


def entries(r: redis.Redis, name: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return r.xrange(stream_keys(name).data)  # type: ignore[return-value]


async def history(pg: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT ds_offset, more, data FROM stream_history WHERE stream_name = $1 ORDER BY ds_offset", name
    )


def offset(entry_id: bytes | str) -> str:
    return format_offset(parse_entry_id(entry_id))


async def test_retention_by_count_trims_committed_whole_appends(
    tiered_gateway, redis_server, postgres_server, pg, r, unique, tmp_path
):
    with running_sink(redis_server.url, postgres_server.url, tmp_path, DSGW_RETAIN_MESSAGES="4"):
        async with httpx.AsyncClient(timeout=10) as client:
            url = tiered_gateway.stream_url(unique)
            assert (await client.put(url, headers=JSON)).status_code == 201
            assert meta(r, unique)["tier"] == "1" and meta(r, unique)["base"] > "0-0"
            await client.post(url, headers=JSON, content=b"[1,2,3]")
            await client.post(url, headers=JSON, content=b"[4,5,6]")
            first = entries(r, unique)
            assert len(first) == 6
            # Keep 4 of 6: the cut falls inside the first append, which goes whole.
            assert await wait_until(now(lambda: meta(r, unique).get("trim")), timeout_s=20)
            m = meta(r, unique)
            assert m["trim"] == first[2][0].decode() and m["synced"] == first[5][0].decode()
            assert [e[0] for e in entries(r, unique)] == [e[0] for e in first[3:]]
            rows = await history(pg, unique)
            assert [(row["ds_offset"], row["more"], row["data"]) for row in rows] == [
                (offset(e[0]), int(e[1].get(b"more", 0)), e[1][b"json"]) for e in first
            ]
            for i in range(7, 27):
                await client.post(url, headers=JSON, content=f"[{i}]".encode())
            # Redis may reach 4 entries before the sink commits the newest few
            # (they are inside the window), so wait for both, then check that
            # what Redis kept is exactly the newest 4 of the history.
            assert await wait_until(now(lambda: len(entries(r, unique)) == 4), timeout_s=20)

            async def all_committed() -> bool:
                return len(await history(pg, unique)) == 26

            assert await wait_until(all_committed, timeout_s=20)
            rows = await history(pg, unique)
            assert [offset(e[0]) for e in entries(r, unique)] == [row["ds_offset"] for row in rows[-4:]]


async def test_history_is_byte_exact_for_every_content_type(
    tiered_gateway, redis_server, postgres_server, pg, r, unique, tmp_path
):
    with running_sink(redis_server.url, postgres_server.url, tmp_path, DSGW_RETAIN_MESSAGES="1000"):
        async with httpx.AsyncClient(timeout=10) as client:
            cases = {
                f"{unique}-bytes": (
                    {"content-type": "application/octet-stream"},
                    [b"\x00\xff\x01", b"", b"\r\n"],
                ),
                f"{unique}-text": ({"content-type": "text/plain; charset=utf-8"}, ["héllo ".encode(), b"w"]),
                f"{unique}-json": (
                    JSON,
                    [b'[ {"b":1,  "a":2, "a":3} , "x\\u0000" ]', b'[{"k": [1.50, 2e3]}]'],
                ),
            }
            for name, (headers, bodies) in cases.items():
                url = tiered_gateway.stream_url(name)
                await client.put(url, headers=headers)
                for body in bodies:
                    if body:
                        assert (await client.post(url, headers=headers, content=body)).status_code == 204
            for name in cases:
                stored = entries(r, name)
                field = b"json" if name.endswith("json") else b"data"
                expected = [(offset(e[0]), int(e[1].get(b"more", 0)), e[1][field]) for e in stored]
                got = await wait_until(functools.partial(_at_least, pg, name, len(stored)), timeout_s=20)
                assert [(row["ds_offset"], row["more"], row["data"]) for row in got] == expected
            raw = b"".join(e[1][b"data"] for e in entries(r, f"{unique}-bytes"))
            assert raw == b"\x00\xff\x01\r\n"


async def _at_least(pg: asyncpg.Connection, name: str, n: int) -> list[asyncpg.Record] | None:
    rows = await history(pg, name)
    return rows if len(rows) >= n else None


async def test_idle_streams_age_out_by_seconds(
    tiered_gateway, redis_server, postgres_server, pg, r, unique, tmp_path
):
    with running_sink(redis_server.url, postgres_server.url, tmp_path, DSGW_RETAIN_SECONDS="2"):
        async with httpx.AsyncClient(timeout=10) as client:
            url = tiered_gateway.stream_url(unique)
            await client.put(url, headers={"content-type": "text/plain"})
            await client.post(url, headers={"content-type": "text/plain"}, content=b"a")
            await client.post(url, headers={"content-type": "text/plain"}, content=b"b")
            appended = entries(r, unique)
            # No append follows: only the sweep can trim it, once 2 s old.
            assert await wait_until(now(lambda: not entries(r, unique)), timeout_s=30)
            assert meta(r, unique)["trim"] == appended[-1][0].decode()
            assert [row["data"] for row in await history(pg, unique)] == [b"a", b"b"]
            assert r.zscore(trim_due_key(stream_keys(unique).shard), unique) is None


async def test_sink_lag_holds_the_trim(
    tiered_gateway, redis_server, postgres_server, pg, r, unique, tmp_path
):
    async with httpx.AsyncClient(timeout=10) as client:
        url = tiered_gateway.stream_url(unique)
        with running_sink(redis_server.url, postgres_server.url, tmp_path, DSGW_RETAIN_SECONDS="0"):
            await client.put(url, headers=JSON)
            await client.post(url, headers=JSON, content=b"[1]")
            assert await wait_until(now(lambda: meta(r, unique).get("trim")), timeout_s=20)
        # Retention 0 s, but the sink is down: the new entry is not in Postgres.
        await client.post(url, headers=JSON, content=b"[2]")
        pending = entries(r, unique)
        assert len(pending) == 1
        await asyncio.sleep(1.5)
        assert entries(r, unique) == pending and meta(r, unique)["synced"] < pending[0][0].decode()
        with running_sink(redis_server.url, postgres_server.url, tmp_path, DSGW_RETAIN_SECONDS="0"):
            assert await wait_until(now(lambda: not entries(r, unique)), timeout_s=20)
            assert [row["data"] for row in await history(pg, unique)] == [b"1", b"2"]


async def test_postgres_down_holds_the_trim(tiered_gateway, redis_server, r, unique, tmp_path):
    from gateway.embedded import start_postgres
    from tests.conftest import reachable_tmp_dir
    from workers.migrate import migrate

    base = reachable_tmp_dir("dsgw-tier-outage-")
    server = start_postgres(base / "pg", durable=False)
    conn = await asyncpg.connect(server.url)
    await migrate(conn)
    await conn.close()
    sink = start_worker("sink", redis_server.url, server.url, tmp_path, DSGW_RETAIN_SECONDS="0", **FAST)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            url = tiered_gateway.stream_url(unique)
            await client.put(url, headers=JSON)
            await client.post(url, headers=JSON, content=b"[1]")
            assert await wait_until(now(lambda: meta(r, unique).get("trim")), timeout_s=20)
            server.stop()
            await client.post(url, headers=JSON, content=b"[2]")
            pending = entries(r, unique)
            await asyncio.sleep(1.5)
            assert entries(r, unique) == pending and len(pending) == 1
            server = start_postgres(base / "pg", port=server.port, durable=False)
            assert await wait_until(now(lambda: not entries(r, unique)), timeout_s=60)
            conn = await asyncpg.connect(server.url)
            assert [row["data"] for row in await history(conn, unique)] == [b"1", b"2"]
            await conn.close()
    finally:
        sink.stop()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_synced_waits_for_older_feed_entries_pending_with_another_sink(redis_server, unique):
    """Two sinks share a feed: the newer batch of a stream commits first. Its
    entries must not be claimed synced (and trimmable) while the older batch,
    pending with the other sink, is not in Postgres yet."""
    import redis.asyncio as aioredis

    from gateway.keys import feed_key
    from workers.tiering import Trimmer

    client = aioredis.Redis.from_url(redis_server.url)
    keys = stream_keys(unique)
    feed = feed_key(keys.shard)
    try:
        await client.hset(keys.meta, "name", unique)
        first = await client.xadd(keys.data, {"json": "1"})
        second = await client.xadd(keys.data, {"json": "2"})
        with contextlib.suppress(redis.ResponseError):
            await client.xgroup_create(feed, "dsgw-sink", id="$", mkstream=True)
        older = await client.xadd(feed, {"stream": unique, "ids": first})
        newer = await client.xadd(feed, {"stream": unique, "ids": second})
        await client.xreadgroup("dsgw-sink", "other", {feed: ">"}, count=1)  # older: pending there
        await client.xreadgroup("dsgw-sink", "me", {feed: ">"}, count=1)
        await client.xack(feed, "dsgw-sink", newer)
        trimmer = Trimmer(client, retain_messages=0, retain_seconds=None)
        await trimmer.committed(feed, {unique: (newer, second)})
        assert await client.hget(keys.meta, "synced") is None
        assert await client.xlen(keys.data) == 2
        await client.xack(feed, "dsgw-sink", older)
        await trimmer.committed(feed, {})  # what the next batch or the sweep does
        assert await client.hget(keys.meta, "synced") == second
        assert await client.xlen(keys.data) == 0  # retention 0 messages: all committed, all trimmed
    finally:
        await client.delete(keys.meta, keys.data)
        await client.aclose()


async def test_a_late_commit_of_a_removed_stream_does_not_touch_its_successor(redis_server, unique):
    """The sink may commit the last entries of a deleted stream after a new
    stream of the same name exists: those are at or below the new one's base
    and must neither raise its synced nor set its trim point."""
    import redis.asyncio as aioredis

    from workers.tiering import Trimmer

    client = aioredis.Redis.from_url(redis_server.url)
    keys = stream_keys(unique)
    try:
        entry = await client.xadd(keys.data, {"json": "1"})
        ms = int(entry.split(b"-")[0])
        await client.hset(keys.meta, mapping={"name": unique, "base": f"{ms - 1}-18446744073709551615"})
        await Trimmer(client, retain_messages=0, retain_seconds=None)._trim([(unique, f"{ms - 5}-0")])
        assert await client.hmget(keys.meta, "synced", "trim") == [None, None]
        assert await client.xlen(keys.data) == 1
    finally:
        await client.delete(keys.meta, keys.data)
        await client.aclose()


async def test_a_large_count_backlog_is_trimmed_in_bounded_steps(redis_server, unique):
    """After a long sink outage a stream may hold far more than N messages: one
    call reads at most 10,000 entries, and the sweep finishes the job."""
    import redis.asyncio as aioredis

    from workers.tiering import Trimmer

    client = aioredis.Redis.from_url(redis_server.url)
    keys = stream_keys(unique)
    try:
        await client.hset(keys.meta, "name", unique)
        pipe = client.pipeline(transaction=False)
        for i in range(25_000):
            pipe.xadd(keys.data, {"data": str(i)})
        ids = await pipe.execute()
        trimmer = Trimmer(client, retain_messages=100, retain_seconds=None)
        await trimmer._trim([(unique, ids[-1].decode())])
        assert await client.xlen(keys.data) == 15_000
        assert await client.zscore(trim_due_key(keys.shard), unique) is not None
        await trimmer.sweep_once()
        await trimmer.sweep_once()
        assert await client.xlen(keys.data) == 100
        assert await client.hget(keys.meta, "trim") == ids[-101]
        await trimmer.sweep_once()  # nothing left to do: no longer due
        assert await client.zscore(trim_due_key(keys.shard), unique) is None
    finally:
        await client.delete(keys.meta, keys.data)
        await client.zrem(trim_due_key(keys.shard), unique)
        await client.aclose()
