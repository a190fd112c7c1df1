"""An SSE read that fails in the middle of a stream says where to resume
before it ends (gateway/reads.py), whether Redis or the history database
(a 503 from a cold read below the trim point) went away."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.protocol import ProblemError
from gateway.reads import StreamReads
from gateway.settings import Settings
from gateway.store_model import ReadResult, StreamMeta

META = StreamMeta("application/json", "application/json", True, tail=(9, 0), closed=False, gen="g")


class FailingStore:
    """The first read of the loop fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise self.error


def events(error: Exception) -> list[tuple[str, dict | list]]:
    gw = SimpleNamespace(settings=Settings(), store=FailingStore(error), draining=False)
    reads = StreamReads(gw)  # type: ignore[arg-type]
    first = ReadResult(META, b"1,2", 2, (5, 0))  # a first chunk that did not reach the tail

    async def collect() -> list[bytes]:
        return [
            chunk
            async for chunk in reads._sse_events("s", first, False, None, SimpleNamespace(version=0), None)
        ]

    parsed = []
    for chunk in asyncio.run(collect()):
        for block in chunk.decode().strip().split("\n\n"):
            kind, data = block.split("\n", 1)
            parsed.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data:"))))
    return parsed


def test_a_failed_cold_read_mid_stream_ends_with_where_to_resume():
    got = events(ProblemError(503, "History unavailable", headers={"retry-after": "1"}))
    assert got[0] == ("data", [1, 2])
    # The first chunk's control, then one more before the end: where to resume.
    assert [kind for kind, _ in got] == ["data", "control", "control"]
    assert got[-1][1]["streamNextOffset"] == "0000000000000005_0000000000000000"
    assert "upToDate" not in got[-1][1]


def test_a_failed_redis_read_mid_stream_ends_with_where_to_resume():
    got = events(RedisConnectionError("gone"))
    assert [kind for kind, _ in got] == ["data", "control", "control"]
    assert got[-1][1]["streamNextOffset"] == "0000000000000005_0000000000000000"


def test_a_stream_deleted_mid_stream_just_ends():
    got = events(ProblemError(404, "Stream not found"))
    assert [kind for kind, _ in got] == ["data", "control"]  # the first chunk and its control only
