"""What the fault scenarios share: a stack per scenario, an idempotent producer
that retries the same seq until it is acknowledged, whole-stream reads, SSE
readers that resume from their last offset, metrics and memory of a process."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from e2e import stack as stack_module

JSON = {"content-type": "application/json"}
ROOT = Path(__file__).resolve().parents[2]


def new_name(prefix: str) -> str:
    return f"chaos-{prefix}-{uuid.uuid4().hex[:8]}"


@contextmanager
def running_stack(
    redis_mode: str = "standalone", env: dict[str, str] | None = None, redis_args: list[str] | None = None
) -> Iterator[stack_module.Stack]:
    """The local stack (3 replicas, nginx, Postgres, sink, source) for one
    scenario; stops exactly what it started, whatever happened."""
    started = time.monotonic()
    running = stack_module.up(redis_mode=redis_mode, replicas=3, env=env, redis_args=redis_args)
    print(f"\n  stack up ({redis_mode}, {' '.join(redis_args or []) or 'default Redis'}) "
          f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    try:
        yield running
    finally:
        stack_module.down()


# --- HTTP ----------------------------------------------------------------------------


class Http1:
    """One bare HTTP/1.1 keep-alive connection. httpx spends ~7 ms of CPU per
    request, more than the gateway spends on an append: with 64 producers on a
    2-core machine the test itself would be the bottleneck."""

    def __init__(self, url: str, timeout_s: float = 30) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); raises OSError (or a subclass) on any
        broken, refused or timed-out connection, which is then dropped."""
        try:
            return await asyncio.wait_for(self._exchange(method, url, headers, body), self.timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = (
            f"{method} {target} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-length: {len(body)}\r\n"
        )
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n" + body)
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        reply = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        if "content-length" in reply:
            data = await reader.readexactly(int(reply["content-length"]))
        elif reply.get("transfer-encoding") == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                data += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            data = b""
        if reply.get("connection", "").lower() == "close":
            self.close()
        return status, reply, data

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


# --- idempotent producers -------------------------------------------------------------


@dataclass
class Producer:
    """One idempotent producer (Producer-Id, epoch 0) and what happened to it."""

    producer_id: str
    url: str
    acked: list[int] = field(default_factory=list)  # seqs acknowledged (200 or 204), in order
    acked_at: dict[int, float] = field(default_factory=dict)  # seq -> time.time() of the ack
    appended: int = 0  # 200: appended now
    duplicates: int = 0  # 204: a retry of an append that had landed before
    retries: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # what made it retry
    refused: list[tuple[int, int, str]] = field(default_factory=list)  # (seq, status, body): a defect
    http: Http1 | None = None

    def body(self, seq: int) -> bytes:
        return json.dumps({"p": self.producer_id, "i": seq}).encode()

    async def append(self, seq: int, body: bytes | None = None) -> bool:
        """Append `seq`, retrying the same (id, epoch, seq) on a 5xx or a broken
        connection: the outcome is unknown, so only the server can tell. True
        once acknowledged; False on any other answer (409 gap, 403 epoch: the
        server lost or invented producer state)."""
        headers = {**JSON, "producer-id": self.producer_id, "producer-epoch": "0", "producer-seq": str(seq)}
        content = body if body is not None else self.body(seq)
        self.http = self.http or Http1(self.url)
        while True:
            try:
                status, _, reply = await self.http.request("POST", self.url, headers, content)
            except ConnectionError as exc:
                self.failures[str(exc).split(":")[0]] += 1
            else:
                if status in (200, 204):
                    self.acked.append(seq)
                    self.acked_at[seq] = time.time()
                    if status == 200:
                        self.appended += 1
                    else:
                        self.duplicates += 1
                    return True
                if status < 500:
                    self.refused.append((seq, status, reply[:300].decode(errors="replace")))
                    return False
                self.failures[str(status)] += 1
            self.retries += 1
            await asyncio.sleep(0.05)

    async def run(self, count: int, pause_s: float = 0.0, stop: asyncio.Event | None = None) -> None:
        """Append seqs 0..count-1 (or until `stop` is set), each until acknowledged."""
        try:
            for seq in range(count):
                if (stop and stop.is_set()) or not await self.append(seq):
                    return
                if pause_s:
                    await asyncio.sleep(pause_s)
        finally:
            if self.http:
                self.http.close()


def client(connections: int = 100, timeout_s: float = 30) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5), limits=limits)


def summarize(producers: list[Producer]) -> str:
    failures: Counter[str] = Counter()
    for p in producers:
        failures.update(p.failures)
    return (
        f"acknowledged {sum(len(p.acked) for p in producers)} appends "
        f"({sum(p.appended for p in producers)} answered 200, {sum(p.duplicates for p in producers)} "
        f"answered 204 = a retry of an append that had landed), "
        f"{sum(p.retries for p in producers)} retries of the same seq "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(failures.items())) or 'none'}), "
        f"{sum(len(p.refused) for p in producers)} refused"
    )


def check_exactly_once_in_order(messages: list[dict], producers: list[Producer]) -> dict[str, int]:
    """Every acknowledged append of every producer present exactly once, in
    the producer's order, and nothing else; the problems found, by kind."""
    by_producer: dict[str, list[int]] = {}
    for m in messages:
        by_producer.setdefault(m["p"], []).append(m["i"])
    problems: Counter[str] = Counter()
    for p in producers:
        stored = by_producer.pop(p.producer_id, [])
        acked = set(p.acked)
        problems["lost (acknowledged, not in the stream)"] += len(acked - set(stored))
        problems["duplicated"] += len(stored) - len(set(stored))
        problems["out of the producer's order"] += sum(1 for a, b in itertools.pairwise(stored) if b <= a)
        problems["in the stream, never acknowledged"] += len(set(stored) - acked)
        problems["refused (409/403/4xx)"] += len(p.refused)
    problems["from unknown producers"] += sum(len(v) for v in by_producer.values())
    return {k: v for k, v in problems.items()}


# --- reads ---------------------------------------------------------------------------


async def read_all(client: httpx.AsyncClient, url: str) -> list:
    """The whole stream, chunk after chunk, up to its tail."""
    messages: list = []
    offset = "-1"
    while True:
        response = await client.get(url, params={"offset": offset})
        response.raise_for_status()
        messages.extend(response.json())
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return messages


@dataclass
class SseReader:
    """Reads a stream over SSE until it holds `total` messages; on any break
    it resumes from the last offset a control event gave it."""

    url: str
    total: int
    received: list = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    reconnects: int = 0
    offset: str = "-1"

    async def run(self, client: httpx.AsyncClient) -> None:
        while len(self.received) < self.total:
            try:
                async with client.stream(
                    "GET", self.url, params={"offset": self.offset, "live": "sse"}
                ) as sse:
                    sse.raise_for_status()
                    event = None
                    pending: list = []
                    async for line in sse.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "data":
                            pending.extend(json.loads(line[5:]))
                        elif line.startswith("data:") and event == "control":
                            # Data counts once its control (and offset) came: a break
                            # in between replays it from the previous offset.
                            self.offset = json.loads(line[5:])["streamNextOffset"]
                            now = time.time()
                            self.received.extend(pending)
                            self.received_at.extend([now] * len(pending))
                            pending = []
                            if len(self.received) >= self.total:
                                return
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            self.reconnects += 1
            await asyncio.sleep(0.05)


@dataclass
class LongPollReader:
    """Follows a stream with long-polls until it holds `total` messages."""

    url: str
    total: int
    received: list = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    offset: str = "-1"

    async def run(self, client: httpx.AsyncClient) -> None:
        while len(self.received) < self.total:
            try:
                response = await client.get(self.url, params={"offset": self.offset, "live": "long-poll"})
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            if response.status_code == 200:
                messages = response.json()
                self.received.extend(messages)
                self.received_at.extend([time.time()] * len(messages))
            elif response.status_code != 204:
                await asyncio.sleep(0.05)
                continue
            self.offset = response.headers["stream-next-offset"]


# --- processes -----------------------------------------------------------------------


def metrics(base_url: str) -> dict[str, float]:
    """A replica's /metrics as {'name{labels}': value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB: now and its peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    hwm = re.search(r"VmHWM:\s+(\d+)", status)
    assert rss and hwm
    return int(rss.group(1)), int(hwm.group(1))


async def until(predicate, timeout_s: float, every_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Wait until `predicate()` (a plain function) is true; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True
