"""SSE readers resting at their stream's tail get new events written to their
sockets by the stream's pump (gateway/sse_fanout.py), not by waking each
reader's task: every reader still gets every message once, in order, and the
stream's close and a gateway's shutdown still reach them."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.conftest import GatewayProcess


def metric(gw: GatewayProcess, prefix: str) -> float:
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(prefix + " ") or line.startswith(prefix + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class SseReader(threading.Thread):
    """Collects the data events (JSON arrays) and control events of one SSE read."""

    def __init__(self, url: str, offset: str) -> None:
        super().__init__(daemon=True)
        self.url, self.offset = url, offset
        self.messages: list[object] = []
        self.controls: list[dict] = []
        self.ended = False

    def run(self) -> None:
        params = {"offset": self.offset, "live": "sse"}
        with httpx.stream("GET", self.url, params=params, timeout=30) as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    value = json.loads(line[5:])
                    if kind == "data":
                        self.messages.extend(value)
                    else:
                        self.controls.append(value)
        self.ended = True


def test_resting_readers_get_every_message_once_in_order(gateway, unique):
    url = gateway.stream_url(unique)
    tail = httpx.put(url, headers={"content-type": "application/json"}).headers["stream-next-offset"]
    readers = [SseReader(url, tail) for _ in range(30)]
    for reader in readers:
        reader.start()
    wait_for(lambda: all(r.controls for r in readers))  # every reader is at the tail
    direct_before = metric(gateway, "dsgw_sse_direct_events_total")
    for n in range(10):
        assert httpx.post(url, json=[{"n": n}]).status_code == 204
        wait_for(lambda n=n: all(len(r.messages) == n + 1 for r in readers))
    # A burst: several appends while the pump may be busy writing.
    for n in range(10, 40):
        assert httpx.post(url, json=[{"n": n}]).status_code == 204
    wait_for(lambda: all(len(r.messages) >= 40 for r in readers))
    for reader in readers:
        assert reader.messages == [{"n": n} for n in range(40)]
    # The pump wrote (most of) them: without it this stays where it was.
    assert metric(gateway, "dsgw_sse_direct_events_total") > direct_before
    httpx.post(url, headers={"stream-closed": "true", "content-type": "application/json"})
    for reader in readers:
        reader.join(10)
        assert reader.ended
        assert reader.controls[-1].get("streamClosed") is True


def test_readers_at_different_offsets_each_get_their_own_continuation(gateway, unique):
    url = gateway.stream_url(unique)
    httpx.put(url, headers={"content-type": "application/json"})
    offsets = []
    for n in range(5):
        offsets.append(httpx.post(url, json=[{"n": n}]).headers["stream-next-offset"])
    readers = [SseReader(url, offset) for offset in offsets]  # after message 0, 1, ... 4
    for reader in readers:
        reader.start()
    wait_for(lambda: all(r.controls for r in readers))
    for n in range(5, 8):
        httpx.post(url, json=[{"n": n}])
    wait_for(lambda: all(r.messages and r.messages[-1] == {"n": 7} for r in readers))
    for start, reader in enumerate(readers, start=1):
        assert reader.messages == [{"n": n} for n in range(start, 8)]
