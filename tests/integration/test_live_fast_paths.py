"""The fast paths of live reads give the same answers as the slow ones.

- SSE readers resting at their stream's tail get new events written to their
  sockets by the stream's pump (gateway/sse_fanout.py), not by waking each
  reader's task: every reader still gets every message once, in order, and the
  stream's close still reaches them.
- A long-poll at the tail is answered from the data a small append's
  notification carries (gateway/lua/append.lua), byte for byte and header for
  header what a read from the same offset returns."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import GatewayProcess, start_gateway


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
        reader.join(30)
        assert reader.ended
        assert reader.controls[-1].get("streamClosed") is True


def test_resting_readers_learn_of_a_close_at_once(redis_server, tmp_path, unique):
    """A close without data, while every reader rests: they end now, not at
    their next keep-alive (60 s here, far past the test's wait)."""
    gw = start_gateway(redis_server.url, tmp_path, DSGW_SSE_KEEPALIVE_MS="60000")
    try:
        url = gw.stream_url(unique)
        tail = httpx.put(url, headers={"content-type": "application/json"}).headers["stream-next-offset"]
        readers = [SseReader(url, tail) for _ in range(5)]
        for reader in readers:
            reader.start()
        wait_for(lambda: all(r.controls for r in readers))
        # Append until one message reached every reader through the pump: then all rest.
        for n in range(20):
            before = metric(gw, "dsgw_sse_direct_events_total")
            assert httpx.post(url, json=[{"n": n}]).status_code == 204
            wait_for(lambda n=n: all(len(r.messages) == n + 1 for r in readers))
            if metric(gw, "dsgw_sse_direct_events_total") - before == len(readers):
                break
        else:
            raise AssertionError("the readers never all rested")
        httpx.post(url, headers={"stream-closed": "true", "content-type": "application/json"})
        for reader in readers:
            reader.join(15)
            assert reader.ended
            assert reader.controls[-1].get("streamClosed") is True
    finally:
        gw.stop()


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


def assert_same_answer(url: str, offset: str, live: httpx.Response) -> None:
    plain = httpx.get(url, params={"offset": offset})
    assert live.status_code == plain.status_code == 200
    assert live.content == plain.content
    for header in ("content-type", "stream-next-offset", "etag"):
        assert live.headers[header] == plain.headers[header], header


class LongPoll(threading.Thread):
    def __init__(self, url: str, offset: str) -> None:
        super().__init__(daemon=True)
        self.url, self.offset = url, offset
        self.response: httpx.Response | None = None

    def run(self) -> None:
        params = {"offset": self.offset, "live": "long-poll"}
        self.response = httpx.get(self.url, params=params, timeout=30)


def poll_then_append(gw: GatewayProcess, url: str, offset: str, **append) -> httpx.Response:  # type: ignore[no-untyped-def]
    waiting = metric(gw, 'dsgw_live_readers{mode="long-poll"}')
    poll = LongPoll(url, offset)
    poll.start()
    wait_for(lambda: metric(gw, 'dsgw_live_readers{mode="long-poll"}') == waiting + 1)
    assert httpx.post(url, **append).status_code == 204
    poll.join(30)
    assert poll.response is not None
    return poll.response


@pytest.fixture
def patient_gateway(redis_server, tmp_path):  # type: ignore[no-untyped-def]
    """Long-polls that wait longer than the other tests' 500 ms: a loaded
    machine must not turn an answer into a timeout."""
    gw = start_gateway(redis_server.url, tmp_path, DSGW_LONG_POLL_TIMEOUT_MS="30000")
    yield gw
    gw.stop()


def test_a_long_poll_is_answered_from_the_notification_exactly_as_a_read(patient_gateway, unique):
    gw = patient_gateway
    url = gw.stream_url(unique + "-json")
    tail = httpx.put(url, headers={"content-type": "application/json"}).headers["stream-next-offset"]
    pushed_before = metric(gw, "dsgw_live_pushed_reads_total")
    live = poll_then_append(gw, url, tail, content=b'[{"b": 1,  "a":2}, "x\\ny", 3]',
                            headers={"content-type": "application/json"})  # fmt: skip
    assert_same_answer(url, tail, live)
    assert live.json() == [{"b": 1, "a": 2}, "x\ny", 3]
    tail = live.headers["stream-next-offset"]
    text = gw.stream_url(unique + "-text")
    text_tail = httpx.put(text, headers={"content-type": "text/plain"}).headers["stream-next-offset"]
    live_text = poll_then_append(
        gw, text, text_tail, content=b"line one\nline two", headers={"content-type": "text/plain"}
    )
    assert_same_answer(text, text_tail, live_text)
    assert live_text.content == b"line one\nline two"
    assert metric(gw, "dsgw_live_pushed_reads_total") == pushed_before + 2
    # Larger appends are not pushed: the reader reads them, with the same result.
    big = [{"n": n, "pad": "p" * 100} for n in range(100)]
    live_big = poll_then_append(gw, url, tail, json=big)
    assert_same_answer(url, tail, live_big)
    assert live_big.json() == big
    assert metric(gw, "dsgw_live_pushed_reads_total") == pushed_before + 2
