"""Tiered history, reading side (issue 11): reads below a stream's trim point
are served from Postgres stream_history, byte for byte as Redis would have
served them, and continue into Redis without a gap or a duplicate; without
a history database they answer 410, with an unreachable one 503.

Real Redis, Postgres, gateway and sink processes: the gateways run with
retention on (so the streams they create are tiered) and each test trims by
starting a sink with the retention it wants (`trim`), after it has read the
stream whole from Redis to compare with."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from gateway.embedded import free_port
from gateway.inspect import stream_info
from gateway.keys import stream_keys
from gateway.offsets import entry_id_to_offset
from tests.conftest import GatewayProcess, start_gateway, start_worker, wait_until
from tests.integration.test_cli import dsgw

JSON = "application/json"
CHUNK_BYTES = 4096  # small, so that a few dozen messages make many chunks
CHUNK_ENTRIES = 40


@pytest.fixture(scope="module")
async def pg(postgres_server) -> AsyncIterator[asyncpg.Connection]:
    from workers.migrate import migrate

    conn = await asyncpg.connect(postgres_server.url)
    await migrate(conn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def r(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _gateway(redis_server, tmp_path_factory, history_url: str, **env: str) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-tier"),
        DSGW_HISTORY_DATABASE_URL=history_url,
        DSGW_READ_CHUNK_BYTES=str(CHUNK_BYTES),
        DSGW_READ_CHUNK_ENTRIES=str(CHUNK_ENTRIES),
        # Retention on: every stream this gateway creates is tiered (the limit
        # itself is the sink's, see `trim`).
        DSGW_RETAIN_MESSAGES="1000000",
        **env,
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def gw(redis_server, postgres_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """History configured."""
    yield from _gateway(redis_server, tmp_path_factory, postgres_server.url)


@pytest.fixture(scope="module")
def gw_none(redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """No history database ("-" also overrides a DATABASE_URL from the environment)."""
    yield from _gateway(redis_server, tmp_path_factory, "-")


@pytest.fixture(scope="module")
def gw_dead(redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """History configured, but nothing listens there: Postgres is down."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    yield from _gateway(redis_server, tmp_path_factory, dead, DSGW_HISTORY_TIMEOUT_MS="2000")


@pytest.fixture
def trim(redis_server, postgres_server, pg, r, tmp_path) -> Callable[[str, int], Awaitable[str]]:
    """trim(name, keep): run a sink with DSGW_RETAIN_MESSAGES=keep until it has
    committed the stream to stream_history and trimmed Redis; the trim point
    (as a DS offset). Stopped then, so later appends stay in Redis."""

    async def trim(name: str, keep: int) -> str:
        meta_key = stream_keys(name).meta
        sink = start_worker(
            "sink", redis_server.url, postgres_server.url, tmp_path,
            DSGW_RETAIN_MESSAGES=str(keep), DSGW_SINK_BLOCK_MS="200",
        )  # fmt: skip
        try:

            async def trimmed() -> bytes | None:
                m = await r.hgetall(meta_key)
                return m.get(b"trim") if m.get(b"synced") == m[b"tail"] else None

            point = await wait_until(trimmed, timeout_s=30)
            assert point, f"never trimmed; see {sink.log_path}"
        finally:
            sink.stop()
        assert await r.xlen(stream_keys(name).data) <= keep
        return entry_id_to_offset(point)

    return trim


@dataclass
class Chunk:
    start: str
    next: str
    body: bytes
    etag: str
    up_to_date: bool


async def catch_up(client: httpx.AsyncClient, url: str, start: str = "-1") -> list[Chunk]:
    chunks = []
    offset = start
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, response.text
        h = response.headers
        chunk = Chunk(offset, h["stream-next-offset"], response.content, h["etag"], "stream-up-to-date" in h)
        chunks.append(chunk)
        if chunk.up_to_date:
            return chunks
        assert chunk.next > offset or offset == "-1"
        offset = chunk.next
    raise AssertionError("never up to date")


def joined(chunks: list[Chunk], json_mode: bool) -> bytes:
    """All the messages a catch-up returned, as one body (JSON: texts joined by ',')."""
    if json_mode:
        return b",".join(c.body[1:-1] for c in chunks if c.body != b"[]")
    return b"".join(c.body for c in chunks)


def json_appends() -> list[bytes]:
    """Key order, spacing and number digits a jsonb round trip would lose;
    multi-message appends; messages larger than a chunk."""
    appends = []
    for i in range(30):
        if i % 5 == 0:
            appends.append(b"[" + b",".join(b'{"n": %d, "part":%d}' % (i, k) for k in range(6)) + b"]")
        elif i % 7 == 0:
            appends.append(b'{"big":"' + b"x" * (CHUNK_BYTES * 2 + i) + b'"}')
        else:
            appends.append(b'{"z":1,  "a":[1.000000000000000000001, %d], "z":2}' % i)
    return appends


def small_json_appends() -> list[bytes]:
    """Chunks end by message count (CHUNK_ENTRIES), after the append that reaches it."""
    return [b"[" + b",".join(b"%d" % (i * 7 + k) for k in range(7)) + b"]" for i in range(30)]


def byte_appends() -> list[bytes]:
    return [os.urandom(CHUNK_BYTES * 3 if i % 6 == 0 else 100 + i) for i in range(30)]


def text_appends() -> list[bytes]:
    return [f"line {i} é\n".encode() * (700 if i % 8 == 0 else 1) for i in range(30)]


async def make_stream(client: httpx.AsyncClient, url: str, content_type: str, appends: list[bytes]) -> None:
    assert (await client.put(url, headers={"content-type": content_type})).status_code == 201
    for body in appends:
        response = await client.post(url, headers={"content-type": content_type}, content=body)
        assert response.status_code == 204, response.text


@pytest.mark.parametrize(
    ("content_type", "appends"),
    [
        (JSON, json_appends()),
        (JSON, small_json_appends()),
        ("application/octet-stream", byte_appends()),
        ("text/plain", text_appends()),
    ],
    ids=["json", "json-by-count", "bytes", "text"],
)
async def test_catch_up_across_the_boundary_is_byte_identical(gw, r, trim, unique, content_type, appends):
    json_mode = content_type == JSON
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, content_type, appends)
        hot = await catch_up(client, url)
        trim = await trim(unique, keep=8)
        tiered = await catch_up(client, url)

        assert joined(tiered, json_mode) == joined(hot, json_mode)
        assert tiered[-1].next == hot[-1].next
        # Below the trim point the chunks are the very ones Redis served: same
        # bodies, same next offsets, same ETags, not up to date.
        cold = [c for c in tiered if c.next <= trim]
        assert len(cold) >= 2
        assert cold[-1].next == trim  # the read that reaches trim stops there: the next one is Redis's
        for before, after in zip(hot, cold[:-1], strict=False):
            assert (after.start, after.next, after.body, after.etag) == (
                before.start, before.next, before.body, before.etag
            )  # fmt: skip
            assert not after.up_to_date
        # A cold chunk answers If-None-Match like a hot one.
        again = await client.get(url, params={"offset": "-1"}, headers={"if-none-match": cold[0].etag})
        assert again.status_code == 304 and again.headers["etag"] == cold[0].etag
        # Any offset below the trim point resumes exactly there.
        middle = hot[1].next
        from_middle = await catch_up(client, url, middle)
        assert joined(from_middle, json_mode) == joined(await catch_up_hot(hot, middle), json_mode)

        head = await client.head(url)
        assert head.headers["stream-hot-offset"] == trim
        assert "stream-earliest-offset" not in head.headers  # with history, everything can be read


async def catch_up_hot(hot: list[Chunk], start: str) -> list[Chunk]:
    index = next(i for i, c in enumerate(hot) if c.start == start)
    return hot[index:]


async def trimmed_json_stream(client: httpx.AsyncClient, url: str, trim, name: str) -> bytes:  # type: ignore[no-untyped-def]
    """A JSON stream trimmed to its newest 5 entries; all its messages as one body."""
    await make_stream(client, url, JSON, json_appends())
    expected = joined(await catch_up(client, url), True)
    await trim(name, keep=5)
    return expected


async def test_long_poll_starting_below_the_boundary(gw, trim, unique):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        expected = await trimmed_json_stream(client, url, trim, unique)
        bodies, offset = [], "-1"
        while True:
            response = await client.get(url, params={"offset": offset, "live": "long-poll"})
            assert response.status_code == 200
            bodies.append(response.content[1:-1])
            offset = response.headers["stream-next-offset"]
            if "stream-up-to-date" in response.headers:
                break
        assert b",".join(bodies) == expected
        # Caught up: the next long-poll waits in Redis for the next append (or
        # times out first, then the following one finds it).
        task = asyncio.ensure_future(client.get(url, params={"offset": offset, "live": "long-poll"}))
        await client.post(url, headers={"content-type": JSON}, content=b'{"after":"trim"}')
        response = await task
        for _ in range(20):
            if response.status_code != 204:
                break
            response = await client.get(url, params={"offset": offset, "live": "long-poll"})
        assert response.status_code == 200 and response.content == b'[{"after":"trim"}]'


def sse_events(lines: list[str]) -> list[tuple[str, str]]:
    events, kind, data = [], "", []
    for line in lines:
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and kind:
            events.append((kind, "\n".join(data)))
            kind, data = "", []
    return events


async def test_sse_starting_below_the_boundary(gw, trim, unique):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        expected = await trimmed_json_stream(client, url, trim, unique)
        data: list[str] = []
        lines: list[str] = []
        async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
            assert response.status_code == 200
            appended = False
            async for line in response.aiter_lines():
                lines.append(line)
                if line != "":
                    continue
                events = sse_events(lines)
                if not events:
                    continue
                kind, payload = events[-1]
                lines = []
                if kind == "data":
                    data.append(payload)
                elif json.loads(payload).get("upToDate"):
                    if appended:
                        break
                    appended = True
                    await client.post(url, headers={"content-type": JSON}, content=b'{"after":"trim"}')
        bodies = [d[1:-1] for d in data]
        assert ",".join(bodies).encode() == expected + b',{"after":"trim"}'


async def test_fork_of_a_trimmed_source_reads_its_history(gw, r, trim, unique):
    source = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, source, JSON, [b'{"m":%d}' % i for i in range(40)])
        offsets = [entry_id_to_offset(eid) for eid, _ in await r.xrange(stream_keys(unique).data)]
        forks = {}
        # One fork point below the coming trim point, one above it.
        for label, at in (("low", offsets[10]), ("high", offsets[37])):
            name = f"{unique}-{label}"
            response = await client.put(
                gw.stream_url(name),
                headers={
                    "content-type": JSON,
                    "stream-forked-from": f"/v1/stream/{unique}",
                    "stream-fork-offset": at,
                },
            )
            assert response.status_code == 201, response.text
            for i in range(3):
                await client.post(
                    gw.stream_url(name), headers={"content-type": JSON}, content=b'{"own":%d}' % i
                )
            forks[name] = joined(await catch_up(client, gw.stream_url(name)), True)
        trim = await trim(unique, keep=5)
        assert offsets[10] < trim < offsets[37]
        for name, before in forks.items():
            assert joined(await catch_up(client, gw.stream_url(name)), True) == before, name
        assert forks[f"{unique}-low"].startswith(b'{"m":0},{"m":1}')
        assert forks[f"{unique}-high"].endswith(b'{"m":37},{"own":0},{"own":1},{"own":2}')


async def test_without_history_reads_below_the_trim_point_are_410(gw_none, r, trim, unique):
    url = gw_none.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'{"m":%d}' % i for i in range(20)])
        trim = await trim(unique, keep=5)
        for params in (
            {"offset": "-1"},
            {"offset": "-1", "live": "long-poll"},
            {"offset": "-1", "live": "sse"},
        ):
            response = await client.get(url, params=params)
            assert response.status_code == 410, params
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 410
            assert response.headers["stream-earliest-offset"] == trim
        retained = await client.get(url, params={"offset": trim})
        assert retained.status_code == 200
        assert retained.json() == [{"m": i} for i in range(15, 20)]
        head = await client.head(url)
        assert head.headers["stream-earliest-offset"] == trim
        assert head.headers["stream-hot-offset"] == trim
        fork = gw_none.stream_url(f"{unique}-fork")
        created = await client.put(
            fork, headers={"content-type": JSON, "stream-forked-from": f"/v1/stream/{unique}"}
        )
        assert created.status_code == 201
        refused = await client.get(fork, params={"offset": "-1"})
        assert refused.status_code == 410 and refused.headers["stream-earliest-offset"] == trim
        metrics = (await client.get(f"{gw_none.url}/metrics")).text
        assert 'dsgw_cold_read_errors_total{reason="no_history"}' in metrics


async def test_postgres_down_cold_reads_503_hot_reads_work(gw_dead, gw, r, trim, unique):
    url = gw_dead.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'{"m":%d}' % i for i in range(20)])
        trim = await trim(unique, keep=5)
        cold = await client.get(url, params={"offset": "-1"})
        assert cold.status_code == 503
        assert cold.headers["retry-after"] == "1"
        assert cold.headers["content-type"] == "application/problem+json"
        hot = await client.get(url, params={"offset": trim})
        assert hot.status_code == 200 and len(hot.json()) == 5
        appended = await client.post(url, headers={"content-type": JSON}, content=b'{"m":20}')
        assert appended.status_code == 204
        # The same read through a gateway whose Postgres answers.
        healthy = await catch_up(client, gw.stream_url(unique))
        assert joined(healthy, True) == b",".join(b'{"m":%d}' % i for i in range(21))
        metrics = (await client.get(f"{gw_dead.url}/metrics")).text
        assert 'dsgw_cold_read_errors_total{reason="unavailable"}' in metrics


async def test_a_recreated_stream_never_reads_the_earlier_ones_history(gw, r, trim, unique):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'{"old":%d}' % i for i in range(20)])
        old_trim = await trim(unique, keep=5)
        assert (await client.delete(url)).status_code == 204
        await make_stream(client, url, JSON, [b'{"new":%d}' % i for i in range(20)])
        await trim(unique, keep=5)
        expected = b",".join(b'{"new":%d}' % i for i in range(20))
        assert joined(await catch_up(client, url), True) == expected
        # An offset of the earlier stream resumes at the start of this one.
        assert joined(await catch_up(client, url, old_trim), True) == expected


async def test_info_and_metrics_show_the_tiers(gw, r, trim, redis_server, unique):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'{"m":%d}' % i for i in range(20)])
        trim = await trim(unique, keep=5)
        tail = (await client.head(url)).headers["stream-next-offset"]
        info = await stream_info(r, unique)
        assert info is not None
        assert info["hot_range"] == {"from": trim, "to": tail}
        assert info["cold_range"]["to"] == trim
        assert info["cold_range"]["from"] < trim
        shown = dsgw(redis_server.url, "info", unique)
        assert shown.returncode == 0, shown.stderr
        assert f"{trim} .. {tail}" in shown.stdout and f".. {trim}" in shown.stdout
        before = _metric((await client.get(f"{gw.url}/metrics")).text, "dsgw_cold_reads_total")
        chunks = await catch_up(client, url)
        after_text = (await client.get(f"{gw.url}/metrics")).text
        cold_chunks = [c for c in chunks if c.next <= trim]
        assert _metric(after_text, "dsgw_cold_reads_total") - before == len(cold_chunks)
        assert _metric(after_text, "dsgw_cold_read_bytes_total") > 0


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_dsgw_tail_prints_trimmed_messages_from_history(
    gw, r, trim, redis_server, postgres_server, unique
):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'[{"m":%d},{"m":%d}]' % (i, i + 1) for i in range(0, 40, 2)])
    untrimmed = dsgw(redis_server.url, "tail", unique, "--json")
    assert untrimmed.returncode == 0, untrimmed.stderr
    await trim(unique, keep=6)
    tiered = dsgw(redis_server.url, "tail", unique, "--json", DSGW_HISTORY_DATABASE_URL=postgres_server.url)
    assert tiered.returncode == 0, tiered.stderr
    assert tiered.stdout == untrimmed.stdout
    assert len(tiered.stdout.splitlines()) == 40
    last = dsgw(redis_server.url, "tail", unique, "-n", "9", DSGW_HISTORY_DATABASE_URL=postgres_server.url)
    assert [json.loads(line.split("  ", 1)[1]) for line in last.stdout.splitlines()] == [
        {"m": i} for i in range(31, 40)
    ]
    refused = dsgw(redis_server.url, "tail", unique, DSGW_HISTORY_DATABASE_URL="-")
    assert refused.returncode == 1
    assert "Offset below the retained data" in refused.stderr


async def test_fork_with_a_sub_offset_below_the_trim_point(gw, r, trim, unique):
    """The fork's first append copies part of the source's next append, which
    may already be in the history only."""
    source = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(
            client,
            source,
            JSON,
            [b'[{"m":%d},{"m":%d},{"m":%d}]' % (i, i + 1, i + 2) for i in range(0, 30, 3)],
        )
        offsets = [entry_id_to_offset(eid) for eid, _ in await r.xrange(stream_keys(unique).data)]
        fork_headers = {
            "content-type": JSON,
            "stream-forked-from": f"/v1/stream/{unique}",
            "stream-fork-offset": offsets[5],  # the end of the second append
            "stream-fork-sub-offset": "2",
        }
        before = gw.stream_url(f"{unique}-before")
        assert (await client.put(before, headers=fork_headers)).status_code == 201
        expected = joined(await catch_up(client, before), True)
        assert expected == b",".join(b'{"m":%d}' % i for i in range(8))
        await trim(unique, keep=3)
        after = gw.stream_url(f"{unique}-after")
        created = await client.put(after, headers=fork_headers)
        assert created.status_code == 201, created.text
        assert joined(await catch_up(client, after), True) == expected


class CuttableProxy:
    """A TCP proxy to Postgres whose cut() drops every connection and refuses
    new ones until restore(): Postgres going away and coming back, as the
    gateway sees it, without stopping the Postgres the other tests share."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_cold_reads_come_back_when_postgres_does(
    gw, trim, redis_server, postgres_server, unique, tmp_path
):
    url = gw.stream_url(unique)
    async with httpx.AsyncClient(timeout=20) as client:
        await make_stream(client, url, JSON, [b'{"m":%d}' % i for i in range(20)])
        point = await trim(unique, keep=5)
    proxy = CuttableProxy(postgres_server.port)
    await proxy.restore()
    via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    gateway = start_gateway(
        redis_server.url, tmp_path, DSGW_HISTORY_DATABASE_URL=via_proxy, DSGW_HISTORY_TIMEOUT_MS="2000"
    )
    try:
        async with httpx.AsyncClient(timeout=20) as client:
            url = gateway.stream_url(unique)
            assert (await client.get(url, params={"offset": "-1"})).status_code == 200
            await proxy.cut()
            down = await client.get(url, params={"offset": "-1"})
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            assert (await client.get(url, params={"offset": point})).status_code == 200
            await proxy.restore()

            async def cold_read_works() -> bool:
                return (await client.get(url, params={"offset": "-1"})).status_code == 200

            assert await wait_until(cold_read_works, timeout_s=20)
    finally:
        gateway.stop()
        await proxy.cut()
