"""Scenario 5: 1,000 SSE readers on one replica, 50 of which connect and then
never read (a 4 KiB receive buffer, never drained). The replica's memory stays
bounded (its peak RSS is printed), the 950 others get every message as if
nothing happened, and the stalled ones are cut off after
DSGW_SSE_SEND_TIMEOUT_MS (dsgw_sse_cut_off_total) and resume from their last
offset without a gap or a duplicate.

The readers go straight to one replica rather than through nginx: nginx's own
buffers would sit between a stalled client and the gateway, and the point is
what one gateway process does with 50 clients that take nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from e2e.chaos.tools import (
    JSON,
    Producer,
    client,
    memory_kib,
    metrics,
    new_name,
    read_all,
    running_stack,
    until,
)

SMALL_STREAMS = 9
READERS_PER_SMALL = 100  # 900 readers
BIG_READERS = 50  # + 50 stalled ones on the big stream: 1,000
STALLED = 50
SMALL_MESSAGES = 100
BIG_MESSAGES = 40
BIG_MESSAGE_BYTES = 100_000  # 4 MB through each reader of the big stream
SEND_TIMEOUT_MS = 3000
ENV = {
    "DSGW_SSE_SEND_TIMEOUT_MS": str(SEND_TIMEOUT_MS),
    "DSGW_SSE_MAX_LIFETIME_MS": "600000",  # no recycling during the run
}
# Peak RSS the replica may reach: what it holds with no reader, plus 64 KiB per
# reader and 2 MiB per stalled one (a blocked SSE write holds at most one
# event, itself at most DSGW_READ_CHUNK_BYTES = 1 MiB, plus the socket's buffer).
PER_READER_KIB = 64
PER_STALLED_KIB = 2048


class SseEvents:
    """Incremental parser of an SSE body: complete (event, data) pairs."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n\n")
        events = []
        for block in complete:
            kind, lines = "message", []
            for line in block.decode().split("\n"):
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    lines.append(line[5:].lstrip(" "))
            events.append((kind, "\n".join(lines)))
        return events


class Reader:
    """An SSE reader over HTTP/1.0 (no chunked framing: the body runs until the
    connection closes) that reads everything, resuming from its last offset."""

    def __init__(self, port: int, path: str, total: int, offset: str = "-1") -> None:
        self.port, self.path, self.total, self.offset = port, path, total, offset
        self.messages: list = []
        self.received_at: list[float] = []
        self.connections = 0

    async def run(self) -> None:
        while len(self.messages) < self.total:
            self.connections += 1
            try:
                await self._read_once()
            except (OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)

    async def _read_once(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET {self.path}?offset={self.offset}&live=sse HTTP/1.0\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")
            parser, pending = SseEvents(), []
            while chunk := await reader.read(65536):
                for kind, data in parser.feed(chunk):
                    if kind == "data":
                        pending.extend(json.loads(data))
                    elif kind == "control":
                        self.offset = json.loads(data)["streamNextOffset"]
                        self.messages.extend(pending)
                        self.received_at.extend([time.time()] * len(pending))
                        pending = []
                        if len(self.messages) >= self.total:
                            return
        finally:
            writer.close()


class StalledReader:
    """Connects, reads the response head and first control event (its offset),
    then never reads again: a plain blocking socket asyncio never touches."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path}?offset=-1&live=sse HTTP/1.0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        self.parser = SseEvents()
        self.offset = "-1"
        self.messages: list = []
        self.pending: list = []  # data whose control event has not come yet
        self._take(head.split(b"\r\n\r\n", 1)[1])
        while self.offset == "-1":
            self._take(self.sock.recv(4096))

    def _take(self, data: bytes) -> None:
        for kind, text in self.parser.feed(data):
            if kind == "data":
                self.pending.extend(json.loads(text))
            elif kind == "control":
                self.offset = json.loads(text)["streamNextOffset"]
                self.messages.extend(self.pending)
                self.pending = []

    def drain(self) -> str:
        """Read what the gateway had sent before it cut the connection; how it ended."""
        self.sock.settimeout(5)
        try:
            while data := self.sock.recv(65536):
                self._take(data)
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "still open"
        finally:
            self.sock.close()
        return "closed"


async def test_1000_sse_readers_50_stalled():
    started = time.monotonic()
    with running_stack(env=ENV) as stack:
        replica = stack.find("gateway")[0]
        base = f"http://127.0.0.1:{replica.port}"
        small = [f"/v1/stream/{new_name(f'small-{k}')}" for k in range(SMALL_STREAMS)]
        big = f"/v1/stream/{new_name('big')}"
        async with client() as http:
            for path in [*small, big]:
                assert (await http.put(base + path, headers=JSON)).status_code == 201
        baseline_kib = memory_kib(replica.pid)[0]

        stalled = [await asyncio.to_thread(StalledReader, replica.port, big) for _ in range(STALLED)]
        readers = [
            Reader(replica.port, path, SMALL_MESSAGES) for path in small for _ in range(READERS_PER_SMALL)
        ]
        readers += [Reader(replica.port, big, BIG_MESSAGES) for _ in range(BIG_READERS)]
        tasks = []
        for i in range(0, len(readers), 100):  # connect in steps, not all in one burst
            tasks += [asyncio.create_task(r.run()) for r in readers[i : i + 100]]
            await asyncio.sleep(0.2)
        live = 'dsgw_live_readers{mode="sse"}'
        assert await until(lambda: metrics(base).get(live, 0) >= STALLED + len(readers), 60, every_s=0.5)
        connected_kib = memory_kib(replica.pid)[0]

        peak_kib = [connected_kib]
        sampling = True

        async def sample() -> None:
            while sampling:
                peak_kib.append(memory_kib(replica.pid)[0])
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        small_producers = [Producer(f"small-{k}", base + path) for k, path in enumerate(small)]
        big_producer = Producer("big", base + big)
        pad = "x" * BIG_MESSAGE_BYTES

        async def produce_big() -> None:
            for i in range(BIG_MESSAGES):
                await big_producer.append(i, json.dumps({"p": "big", "i": i, "pad": pad}).encode())
                await asyncio.sleep(0.1)

        produced = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(produce_big(), *(p.run(SMALL_MESSAGES, 0.05) for p in small_producers)), 180
        )
        produce_s = time.monotonic() - produced
        _, unfinished = await asyncio.wait(tasks, timeout=120)
        for task in unfinished:
            task.cancel()
        if unfinished:
            short = [
                (r.path == big, len(r.messages), r.total, r.connections)
                for r in readers
                if len(r.messages) < r.total
            ]
            print(
                f"  {len(short)} readers unfinished (big stream?, got, expected, connections): {short[:20]}"
            )
        cut = "dsgw_sse_cut_off_total"
        await until(lambda: metrics(base).get(cut, 0) >= STALLED, 60, every_s=0.5)
        await asyncio.sleep(1.5)  # a cut-off count above 50 would show by now
        cut_off = int(metrics(base).get(cut, 0))
        sampling = False
        await sampler
        hwm_kib = memory_kib(replica.pid)[1]

        endings = [await asyncio.to_thread(s.drain) for s in stalled]
        resumed = [Reader(replica.port, big, BIG_MESSAGES - len(s.messages), s.offset) for s in stalled]
        _, unfinished = await asyncio.wait([asyncio.create_task(r.run()) for r in resumed], timeout=120)
        for task in unfinished:
            task.cancel()

        async with client(timeout_s=60) as http:
            stored = {path: await read_all(http, base + path) for path in [*small, big]}
        complete = sum(r.messages == stored[r.path] for r in readers)
        resumed_ok = sum(
            s.messages + r.messages == stored[big] for s, r in zip(stalled, resumed, strict=True)
        )
        delays = [
            at - p.acked_at[m["i"]]
            for r in readers
            if r.path != big
            for p in small_producers
            if p.url == base + r.path
            for m, at in zip(r.messages, r.received_at, strict=True)
        ]
        bound_kib = baseline_kib + PER_READER_KIB * (len(readers) + STALLED) + PER_STALLED_KIB * STALLED
        ended = {e: endings.count(e) for e in set(endings)}
        print(f"  replica {replica.port}: {len(readers)} reading SSE readers + {STALLED} that never read; "
              f"{sum(len(v) for v in stored.values())} messages appended in {produce_s:.1f} s "
              f"({BIG_MESSAGES} x {BIG_MESSAGE_BYTES // 1000} kB on the stalled readers' stream)")  # fmt: skip
        print(f"  replica RSS: {baseline_kib // 1024} MiB idle, {connected_kib // 1024} MiB with 1,000 readers, "
              f"peak {max(peak_kib) // 1024} MiB while sending (VmHWM {hwm_kib // 1024} MiB); "
              f"bound {bound_kib // 1024} MiB")  # fmt: skip
        print(f"  {complete} of {len(readers)} reading readers got every message of their stream in order "
              f"(reconnects: {sum(r.connections - 1 for r in readers)}); worst delivery on the small streams "
              f"{max(delays) * 1000:.0f} ms after the append's acknowledgement")  # fmt: skip
        print(f"  dsgw_sse_cut_off_total = {cut_off}; stalled connections ended: {ended}; "
              f"{resumed_ok} of {STALLED} resumed from their last offset to exactly the stream "
              f"(received before the cut: {sum(len(s.messages) for s in stalled)} messages in all)")  # fmt: skip
        print(f"  scenario 5 took {time.monotonic() - started:.0f} s")
        assert complete == len(readers)
        assert cut_off == STALLED and all(e != "still open" for e in endings)
        assert resumed_ok == STALLED
        assert hwm_kib < bound_kib
