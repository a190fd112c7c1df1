"""Tiered history on the 3-master cluster (issue 11): the single-Redis
tiering tests (tests/integration/test_tiering_*.py) again, on Redis Cluster
and through a balancer.

The session stack's gateways and sink run without retention (other tests
need their streams untrimmed), so this module starts, on the same cluster and
Postgres, two gateways with DSGW_RETAIN_MESSAGES and a history database
behind an nginx of its own (deploy/nginx.conf), plus a sink with the same
retention. That sink shares the feeds' consumer group with the stack's sink:
a batch the stack's sink commits records `synced` but trims nothing, so the
stack's sink is stopped while this module runs and started again after.

Shown: streams on every master are trimmed by the sink's pipelined trim.lua
calls (XLEN on the owning node, meta `trim`); a catch-up from -1 through the
balancer returns every message byte for byte, every chunk ending at an offset
an append returned; SSE from -1 crosses the trim point; a fork of a trimmed
source reads its history; the stack's gateways (no history database) answer
410 with Stream-Earliest-Offset below the trim point.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from e2e import stack as stack_module
from gateway.keys import stream_keys, trim_due_key
from gateway.offsets import entry_id_to_offset
from gateway.scripts import script_sha

RETAIN = 5
APPENDS = 24  # per stream before the trim is awaited
PER_MASTER = 2  # streams on each master (one bytes, one JSON)
BINARY = "application/octet-stream"
JSON = "application/json"


@dataclass
class TierStack:
    base_url: str  # this module's balancer
    redis_url: str
    env: dict[str, str]  # the gateways' and the sink's
    procs: list[stack_module.Proc] = field(default_factory=list)

    def start_sink(self, **extra: str) -> None:
        """(Re)start this module's sink with `extra` settings on top of env."""
        for proc in [p for p in self.procs if p.role == "sink"]:
            stack_module.stop_proc(proc)
            self.procs.remove(proc)
        self.procs.append(
            stack_module._spawn(
                "sink",
                [sys.executable, "-m", "gateway.cli", "worker", "sink"],
                stack_module.STACK_DIR / "tier-e2e-sink.log",
                env={"REDIS_URL": self.redis_url, **self.env, **extra},
                marker="worker sink",
            )
        )


def _start_balancer(gateways: list[stack_module.Proc], tag: str) -> stack_module.Proc:
    nginx = stack_module.ensure_nginx()
    nginx_dir = stack_module.STACK_DIR / f"{tag}-nginx"
    nginx_dir.mkdir(parents=True, exist_ok=True)
    port = stack_module.free_port()
    conf = (stack_module.ROOT / "deploy" / "nginx.conf").read_text()
    (nginx_dir / "nginx.conf").write_text(conf.replace("listen 8080;", f"listen 127.0.0.1:{port};"))
    (nginx_dir / "upstreams.conf").write_text("".join(f"server 127.0.0.1:{g.port};\n" for g in gateways))
    proc = stack_module._spawn(
        "nginx",
        [
            nginx,
            "-p",
            str(nginx_dir),
            "-c",
            str(nginx_dir / "nginx.conf"),
            "-e",
            "stderr",
            "-g",
            "daemon off;",
        ],
        stack_module.STACK_DIR / f"{tag}-nginx.log",
        marker=str(nginx_dir),
    )
    proc.port = port
    return proc


@pytest.fixture(scope="module")
def tier(stack: stack_module.Stack) -> Iterator[TierStack]:
    tag = "tier-e2e"
    env = {
        **stack.env,
        "DATABASE_URL": stack.database_url,  # the gateways' history database, the sink's target
        "DSGW_RETAIN_MESSAGES": str(RETAIN),
    }
    own = TierStack(base_url="", redis_url=stack.redis_url, env=env)
    # The stack's sink (no retention) shares the feeds' consumer group: a batch
    # it commits records `synced` but trims nothing. It is stopped (drained)
    # while this module runs and started again after, as e2e/chaos restarts do.
    paused = [proc for proc in stack.find("sink") if stack_module.is_ours(proc)]
    for proc in paused:
        stack_module.stop_proc(proc)
    try:
        for _ in range(2):
            own.procs.append(stack_module.start_gateway_replica(stack, env))
        for proc in own.procs:
            stack_module.wait_ready(f"http://127.0.0.1:{proc.port}/readyz")
        gateways = list(own.procs)
        own.start_sink()
        balancer = _start_balancer(gateways, tag)
        own.procs.append(balancer)
        own.base_url = f"http://127.0.0.1:{balancer.port}"
        stack_module.wait_ready(own.base_url + "/readyz")
        yield own
    finally:
        for proc in reversed(own.procs):  # only what this module started, by PID
            stack_module.stop_proc(proc)
        for proc in paused:
            stack.procs[stack.procs.index(proc)] = stack_module.start_worker(stack, "sink")
        stack.save()


# --- the cluster's layout ---------------------------------------------------------------


def masters(redis_url: str) -> dict[tuple[int, int], redis.Redis]:
    """Each master's slot ranges -> a client of that node alone."""
    slots: Any = redis.Redis.from_url(redis_url).execute_command("CLUSTER", "SLOTS")
    nodes: dict[int, redis.Redis] = {}
    owners: dict[tuple[int, int], redis.Redis] = {}
    for start, end, primary, *_ in slots:
        port = int(primary[1])
        nodes.setdefault(port, redis.Redis(host="127.0.0.1", port=port))
        owners[(int(start), int(end))] = nodes[port]
    return owners


def owner(owners: dict[tuple[int, int], redis.Redis], key: str) -> redis.Redis:
    slot = key_slot(key.encode())
    return next(node for (start, end), node in owners.items() if start <= slot <= end)


def names_on_every_master(
    owners: dict[tuple[int, int], redis.Redis], prefix: str, per_master: int = PER_MASTER
) -> list[str]:
    """`per_master` stream names whose keys live on each master."""
    wanted = {id(node): per_master for node in owners.values()}
    names = []
    i = 0
    while any(wanted.values()):
        name = f"{prefix}/{i}"
        i += 1
        node = owner(owners, stream_keys(name).data)
        if wanted[id(node)]:
            wanted[id(node)] -= 1
            names.append(name)
    return names


# --- HTTP helpers ---------------------------------------------------------------------


@dataclass
class Written:
    content_type: str
    messages: list[bytes] = field(default_factory=list)
    offsets: list[str] = field(default_factory=list)  # Stream-Next-Offset after each append

    def joined(self) -> bytes:
        return (b"," if self.content_type == JSON else b"").join(self.messages)


async def append(client: httpx.AsyncClient, url: str, written: Written, rng: random.Random) -> None:
    if written.content_type == JSON:
        # Two messages per append: a read never cuts an append in two.
        batch = [
            b'{"n":%d, "pad":"%s"}' % (len(written.messages) + k, b"x" * rng.randint(0, 50)) for k in range(2)
        ]
        body = b"[" + b",".join(batch) + b"]"
    else:
        batch = [rng.randbytes(rng.randint(1, 300))]
        body = batch[0]
    response = await client.post(url, headers={"content-type": written.content_type}, content=body)
    assert response.status_code == 204, response.text
    written.messages.extend(batch)
    written.offsets.append(response.headers["stream-next-offset"])


async def catch_up(client: httpx.AsyncClient, url: str, content_type: str) -> list[tuple[str, bytes]]:
    """(Stream-Next-Offset, messages' bytes) of each chunk from -1 until up to date."""
    chunks = []
    offset = "-1"
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, (offset, response.status_code, response.text)
        body = response.content
        chunks.append((response.headers["stream-next-offset"], body[1:-1] if content_type == JSON else body))
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return chunks
    raise AssertionError("never up to date")


def joined(chunks: list[tuple[str, bytes]], content_type: str) -> bytes:
    return (b"," if content_type == JSON else b"").join(body for _, body in chunks if body)


async def sse_until(client: httpx.AsyncClient, url: str, content_type: str, last: str) -> bytes:
    """The data of an SSE read from -1 until a control event reaches `last`."""
    parts: list[bytes] = []
    params = {"offset": "-1", "live": "sse"}
    async with client.stream("GET", url, params=params) as response:
        assert response.status_code == 200
        event, data = "", []
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and event:
                payload = "\n".join(data)
                if event == "data":
                    if content_type == JSON:
                        parts.append(payload.encode()[1:-1])
                    else:
                        parts.append(base64.b64decode(payload))
                elif event == "control" and json.loads(payload)["streamNextOffset"] == last:
                    return (b"," if content_type == JSON else b"").join(p for p in parts if p)
                event, data = "", []
    raise AssertionError("the SSE response ended before reaching the tail")


def trim_point(node: redis.Redis, name: str) -> tuple[str, int]:
    keys = stream_keys(name)
    point: Any = node.hget(keys.meta, "trim")
    return (point.decode() if point else "", int(node.xlen(keys.data)))


# --- the test -------------------------------------------------------------------------------


async def test_tiered_history_on_every_master_through_the_balancer(stack, tier):  # type: ignore[no-untyped-def]
    owners = masters(stack.redis_url)
    assert len({id(n) for n in owners.values()}) == 3
    names = names_on_every_master(owners, f"tier-e2e-{uuid.uuid4().hex[:8]}")
    nodes = {id(n): n for n in owners.values()}.values()
    # Nothing but the sink's Trimmer loads trim.lua: on a fresh cluster its
    # first pipelined EVALSHA on each master gets NOSCRIPT and it must reload.
    trim_sha = script_sha("trim")
    loaded_before = [bool(node.script_exists(trim_sha)[0]) for node in nodes]
    rng = random.Random(11)
    written = {name: Written(BINARY if i % 2 == 0 else JSON) for i, name in enumerate(names)}
    async with httpx.AsyncClient(base_url=tier.base_url, timeout=30) as client:
        for name, w in written.items():
            created = await client.put(f"/v1/stream/{name}", headers={"content-type": w.content_type})
            assert created.status_code == 201, created.text
        for _ in range(APPENDS):
            await asyncio.gather(*(append(client, f"/v1/stream/{n}", w, rng) for n, w in written.items()))

        # This module's sink commits every append, then trims (a bounded wait).
        pending = set(names)
        for _ in range(600):
            for name in list(pending):
                point, length = trim_point(owner(owners, stream_keys(name).data), name)
                if point and length <= RETAIN:
                    pending.discard(name)
            if not pending:
                break
            await asyncio.sleep(0.1)
        state = {n: owner(owners, stream_keys(n).meta).hgetall(stream_keys(n).meta) for n in pending}
        assert not pending, f"never trimmed: {state}; see .stack/tier-e2e-sink.log"
        assert all(node.script_exists(trim_sha)[0] for node in nodes)
        print(f"trim.lua loaded before on {sum(loaded_before)} of 3 masters, now on all 3")

        for name, w in written.items():
            node = owner(owners, stream_keys(name).data)
            point, length = trim_point(node, name)
            # Meta `trim` (an entry ID) ends an append; Redis holds what is above it.
            assert length <= RETAIN < len(w.messages)
            assert entry_id_to_offset(point) in w.offsets
            port = node.connection_pool.connection_kwargs["port"]
            print(f"{name}: {len(w.messages)} messages, {length} in Redis on :{port}, trim {point}")

            # Catch-up from -1 through the balancer: the same bytes, every
            # chunk ending where an append ended, the last at the tail.
            url = f"/v1/stream/{name}"
            chunks = await catch_up(client, url, w.content_type)
            assert joined(chunks, w.content_type) == w.joined(), name
            assert {offset for offset, _ in chunks} <= set(w.offsets), name
            assert chunks[-1][0] == w.offsets[-1]
            head = await client.head(url)
            hot = head.headers["stream-hot-offset"]
            assert "stream-earliest-offset" not in head.headers  # a history database: all readable
            assert hot == entry_id_to_offset(point)

            # SSE from -1 crosses the trim point.
            assert await sse_until(client, url, w.content_type, w.offsets[-1]) == w.joined(), name

            # The stack's gateways have no history database: 410 below the
            # trim point, Stream-Earliest-Offset says where to read from.
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as plain:
                gone = await plain.get(url, params={"offset": "-1"})
                assert gone.status_code == 410
                assert gone.headers["content-type"] == "application/problem+json"
                assert gone.headers["stream-earliest-offset"] == hot
                retained = await plain.get(url, params={"offset": hot})
                assert retained.status_code == 200

        # A fork of a trimmed source (at its tail) reads the source's history.
        source = names[1]  # JSON
        w = written[source]
        fork = f"{source}-fork"
        created = await client.put(
            f"/v1/stream/{fork}",
            headers={"content-type": JSON, "stream-forked-from": f"/v1/stream/{source}",
                     "stream-fork-offset": w.offsets[-1]},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        own = await client.post(f"/v1/stream/{fork}", headers={"content-type": JSON}, content=b'{"own":1}')
        assert own.status_code == 204
        chunks = await catch_up(client, f"/v1/stream/{fork}", JSON)
        assert joined(chunks, JSON) == w.joined() + b',{"own":1}'


async def test_idle_streams_age_out_through_the_sweep_on_every_master(stack, tier):  # type: ignore[no-untyped-def]
    """DSGW_RETAIN_SECONDS: streams that stop receiving appends are trimmed by
    the sink's sweep (one pipelined read of every shard's schedule, one
    pipelined trim.lua round), on each master; their history stays readable."""
    tier.start_sink(DSGW_RETAIN_SECONDS="1", DSGW_TRIM_SWEEP_MS="200")
    owners = masters(stack.redis_url)
    names = names_on_every_master(owners, f"tier-e2e-age-{uuid.uuid4().hex[:8]}", per_master=1)
    rng = random.Random(12)
    written = {name: Written(BINARY) for name in names}
    async with httpx.AsyncClient(base_url=tier.base_url, timeout=30) as client:
        for name, w in written.items():
            assert (
                await client.put(f"/v1/stream/{name}", headers={"content-type": BINARY})
            ).status_code == 201
            for _ in range(3):  # below the count limit: only age trims these
                await append(client, f"/v1/stream/{name}", w, rng)
        pending = set(names)
        for _ in range(300):
            for name in list(pending):
                point, length = trim_point(owner(owners, stream_keys(name).data), name)
                if length == 0 and entry_id_to_offset(point) == written[name].offsets[-1]:
                    pending.discard(name)
            if not pending:
                break
            await asyncio.sleep(0.1)
        assert not pending, f"never aged out: {sorted(pending)}; see .stack/tier-e2e-sink.log"
        for name, w in written.items():
            keys = stream_keys(name)
            # Nothing left to age out: off the shard's schedule.
            assert owner(owners, keys.meta).zscore(trim_due_key(keys.shard), name) is None
            chunks = await catch_up(client, f"/v1/stream/{name}", BINARY)
            assert joined(chunks, BINARY) == w.joined() and chunks[-1][0] == w.offsets[-1]
