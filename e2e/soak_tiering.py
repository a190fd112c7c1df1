"""Tiered history soak: Redis memory stays flat under steady appends.

    python -m e2e.soak_tiering [--minutes 10] [--streams 1000] [--rate 400]
                               [--retain-seconds 30] [--message-bytes 200]

Starts its own Redis 7 (e2e/stack.py's binary), embedded Postgres, one
gateway and one sink, all with DSGW_RETAIN_SECONDS (nothing else must run:
the numbers assume the machine to itself). Then:

1. appends --rate JSON messages per second, one per POST, spread evenly over
   --streams streams, for --minutes, printing Redis `used_memory` every 30 s
   (the curve); asserts it flat (see `assert_flat`);
2. catches up a few of those streams from offset -1, following
   Stream-Next-Offset to the tail: every message acknowledged must come back,
   once, in order (most of it from Postgres: cold reads, TIER-READ);
3. cold vs hot catch-up throughput: a stream written at the start (trimmed
   by the end: read from Postgres) and one of the same size written at the
   end (still in Redis), each read from -1, in MB/s of response bodies.

Exit status 1 when an assertion fails: a catch-up that cannot read below the
trim point fails loudly, it is never skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e.stack import redis7_server  # noqa: E402
from gateway.embedded import start_postgres, start_redis  # noqa: E402
from gateway.keys import stream_keys  # noqa: E402
from tests.conftest import reachable_tmp_dir, start_gateway, start_worker  # noqa: E402
from workers.migrate import migrate_url  # noqa: E402

JSON = {"content-type": "application/json"}
SAMPLE_EVERY_S = 30
CATCH_UP_STREAMS = 5
BULK_BYTES = 8 * 1024 * 1024  # each of the cold and hot catch-up streams
BULK_MESSAGE_BYTES = 1024


def assert_flat(samples: list[tuple[float, int]], warmup_s: float) -> str:
    """Flat: once the retention window has filled (samples after `warmup_s`),
    the second half of the run holds no more than the first, both at its
    peaks and in its median (within 10%, +1 MiB for allocator noise on a
    small heap). Memory swings between samples (a feed backlog between
    commits, trims catching up) are allowed; a trend is not, whatever the run
    length. Without trimming it would grow by every byte appended."""
    steady = [m for t, m in samples if t >= warmup_s]
    if len(steady) < 4:
        raise AssertionError(f"too few samples after the {warmup_s:.0f} s warm-up: run longer")
    half = len(steady) // 2
    first, second = steady[:half], steady[-half:]
    mib = 1024 * 1024
    verdict = (
        f"steady samples {len(steady)}: first half median {statistics.median(first) / mib:.1f} MiB, "
        f"peak {max(first) / mib:.1f}; second half median {statistics.median(second) / mib:.1f} MiB, "
        f"peak {max(second) / mib:.1f}"
    )
    if (
        max(second) > max(first) * 1.1 + mib
        or statistics.median(second) > statistics.median(first) * 1.1 + mib
    ):
        raise AssertionError("used_memory is not flat: " + verdict)
    return verdict


class KeepAlivePoster:
    """POSTs over one HTTP/1.1 keep-alive connection, with no client library
    in between: httpx cost the driver about 6 ms of CPU per request here,
    which capped the soak near 120 appends/s on 2 cores shared with the
    servers. One per driver task; a request is never sent twice on one
    connection at once. Raises OSError/ConnectionError when the connection
    fails (the caller reconnects)."""

    def __init__(self, base: str) -> None:
        address = base.split("://", 1)[1].rstrip("/")
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            await self.close()
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def append_steadily(
    base: str, streams: list[str], rate: float, seconds: float, pad: str
) -> dict[str, int]:
    """Appends at `rate`/s round-robin over `streams` for `seconds`; per
    stream, how many were acknowledged (message n carries its sequence n)."""
    acked = dict.fromkeys(streams, 0)
    next_n = dict.fromkeys(streams, 0)
    locks = {name: asyncio.Lock() for name in streams}
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)

    async def worker() -> None:
        poster = KeepAlivePoster(base)
        try:
            await post_queued(poster)
        finally:
            await poster.close()

    async def post_queued(poster: KeepAlivePoster) -> None:
        while (name := await queue.get()) is not None:
            async with locks[name]:  # a stream's messages in order
                n = next_n[name]
                body = json.dumps([{"n": n, "pad": pad}]).encode()
                # An idempotent producer per stream: a POST whose answer was
                # lost (a keep-alive connection closed under it) is sent again
                # safely, and the gateway keeps exactly one copy.
                headers = {
                    **JSON,
                    "producer-id": f"soak-{name}",
                    "producer-epoch": "0",
                    "producer-seq": str(n),
                }
                for attempt in range(5):
                    try:
                        status, text = await poster.post(f"/v1/stream/{name}", headers, body)
                        break
                    except ConnectionError as exc:
                        print(f"append to {name} (retrying, idempotent): {type(exc).__name__}", flush=True)
                        await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    raise RuntimeError(f"append to {name}: no answer after 5 attempts")
                if status in (200, 204):
                    next_n[name] = n + 1
                    acked[name] = n + 1
                else:
                    print(f"append to {name}: {status} {text[:200]!r}", flush=True)

    workers = [asyncio.create_task(worker()) for _ in range(32)]
    started = time.monotonic()
    sent = 0
    i = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        # A gateway slower than `rate` makes this wait on the queue: the run
        # still ends on time, at the rate the gateway managed (printed).
        while sent < due and time.monotonic() - started < seconds:
            await queue.put(streams[i % len(streams)])
            i += 1
            sent += 1
        await asyncio.sleep(0.01)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    total = sum(acked.values())
    print(f"appends acknowledged: {total} in {time.monotonic() - started:.0f} s "
          f"({total / (time.monotonic() - started):.0f}/s of {rate:.0f}/s asked)", flush=True)  # fmt: skip
    return acked


async def sample_memory(r: aioredis.Redis, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
        if stop.is_set():
            break
        used = (await r.info("memory"))["used_memory"]
        t = time.monotonic() - started
        samples.append((t, used))
        print(f"t={t:5.0f}s used_memory={used / 1024 / 1024:8.2f} MiB", flush=True)


async def catch_up(client: httpx.AsyncClient, url: str) -> tuple[list[bytes], int, float]:
    """Read `url` from -1 to its tail: the bodies, their bytes, the seconds it took."""
    offset, bodies, size = "-1", [], 0
    started = time.perf_counter()
    while True:
        response = await client.get(url, params={"offset": offset})
        if response.status_code != 200:
            raise AssertionError(
                f"catch-up of {url} at {offset}: {response.status_code} {response.text[:300]}"
            )
        bodies.append(response.content)
        size += len(response.content)
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return bodies, size, time.perf_counter() - started


def messages_of(bodies: list[bytes]) -> list[dict]:
    return [m for body in bodies for m in json.loads(body)]


async def write_bulk(client: httpx.AsyncClient, url: str) -> None:
    await client.put(url, headers=JSON)
    per_post = 100
    message = {"pad": "x" * (BULK_MESSAGE_BYTES - 20)}
    for _ in range(BULK_BYTES // (BULK_MESSAGE_BYTES * per_post)):
        response = await client.post(url, headers=JSON, content=json.dumps([message] * per_post).encode())
        assert response.status_code == 204, response.text


async def soak(args: argparse.Namespace) -> int:
    work = reachable_tmp_dir("dsgw-soak-")
    logs = Path(tempfile.mkdtemp(prefix="dsgw-soak-logs-"))
    redis_proc = start_redis(work / "redis", persistent=False, binary=redis7_server())
    pg = start_postgres(work / "pg", durable=False)
    await migrate_url(pg.url)
    env = {
        "DSGW_RETAIN_SECONDS": str(args.retain_seconds),
        "DATABASE_URL": pg.url,
        "DSGW_LOG_LEVEL": "WARNING",
    }
    gateway = start_gateway(redis_proc.url, logs, **env)
    sink = start_worker("sink", redis_proc.url, pg.url, logs, **env)
    r = aioredis.Redis.from_url(redis_proc.url)
    failures: list[str] = []
    try:
        version = (await r.info("server"))["redis_version"]
        print(f"redis {version}, {args.streams} streams, {args.rate}/s for {args.minutes} min, "
              f"DSGW_RETAIN_SECONDS={args.retain_seconds}; logs in {logs}", flush=True)  # fmt: skip
        streams = [f"soak/s{i:04d}" for i in range(args.streams)]
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            for name in streams:
                await client.put(f"{gateway.url}/v1/stream/{name}", headers=JSON)
            await write_bulk(client, f"{gateway.url}/v1/stream/soak/bulk-cold")

            samples: list[tuple[float, int]] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(r, samples, stop))
            pad = "p" * max(0, args.message_bytes - 20)
            acked = await append_steadily(gateway.url, streams, args.rate, args.minutes * 60, pad)
            stop.set()
            await sampler
            total = sum(acked.values())
            print(
                f"appended {total} messages ({total * args.message_bytes / 1024 / 1024:.1f} MiB of payload)"
            )
            try:
                print("flat:", assert_flat(samples, warmup_s=args.retain_seconds + SAMPLE_EVERY_S))
            except AssertionError as exc:
                failures.append(str(exc))

            for name in random.Random(7).sample(streams, CATCH_UP_STREAMS):
                try:
                    bodies, _, _ = await catch_up(client, f"{gateway.url}/v1/stream/{name}")
                    got = [m["n"] for m in messages_of(bodies)]
                    if got != list(range(acked[name])):
                        raise AssertionError(
                            f"{name}: {len(got)} messages back of {acked[name]}, or out of order"
                        )
                    print(f"catch-up {name}: {len(got)} messages in order")
                except AssertionError as exc:
                    failures.append(f"catch-up: {exc}")

            await write_bulk(client, f"{gateway.url}/v1/stream/soak/bulk-hot")
            for label in ("cold", "hot"):
                url = f"{gateway.url}/v1/stream/soak/bulk-{label}"
                keys = stream_keys(f"soak/bulk-{label}")
                trimmed = await r.hget(keys.meta, "trim")
                in_redis = await r.xlen(keys.data)
                try:
                    _, size, seconds = await catch_up(client, url)
                    print(f"{label} catch-up ({in_redis} entries in Redis, trim {trimmed!r}): "
                          f"{size / 1024 / 1024:.1f} MiB in {seconds:.2f} s = "
                          f"{size / 1024 / 1024 / seconds:.1f} MiB/s")  # fmt: skip
                except AssertionError as exc:
                    failures.append(f"{label} catch-up: {exc}")
    finally:
        await r.aclose()
        sink.stop()
        gateway.stop()
        pg.stop()
        redis_proc.stop()
        shutil.rmtree(work, ignore_errors=True)  # the data; the logs stay
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=400.0, help="appends per second, in total")
    parser.add_argument("--retain-seconds", type=int, default=30)
    parser.add_argument("--message-bytes", type=int, default=200)
    os.environ.setdefault("DSGW_LOG_LEVEL", "WARNING")
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
