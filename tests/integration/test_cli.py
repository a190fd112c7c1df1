"""The dsgw inspection commands against a real Redis holding real streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from tests.conftest import ROOT


def dsgw(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_streams_info_and_tail(gateway, redis_server, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "application/json", "stream-ttl": "600"}, content=b'[{"a":1}]')
    producer = {"content-type": "application/json", "producer-id": "ai", "producer-epoch": "3"}
    http.post(url, headers={**producer, "producer-seq": "0"}, content=b'[{"b":2},{"c":3}]')
    http.post(url, headers={**producer, "producer-seq": "1", "stream-closed": "true"}, content=b'"bye"')
    http.put(gateway.stream_url(unique + "-fork"), headers={"stream-forked-from": f"/v1/stream/{unique}"})

    listed = dsgw(redis_server.url, "streams", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["name"] == unique)
    assert row == {
        "name": unique, "content_type": "application/json", "messages": 4, "bytes": 26,
        "closed": True, "ttl": 600, "expires_at": None, "deleted": False, "forked_from": None,
    }  # fmt: skip
    assert "│" in dsgw(redis_server.url, "streams").stdout  # the human table

    info = json.loads(dsgw(redis_server.url, "info", unique, "--json").stdout)
    assert info["producers"][0]["id"] == "ai" and (
        info["producers"][0]["epoch"],
        info["producers"][0]["seq"],
    ) == (3, 1)
    assert info["forks"] == [unique + "-fork"]
    assert info["tail_offset"] == http.head(url).headers["stream-next-offset"]
    assert info["keys"]["data"].endswith(f":{unique}:data")
    assert dsgw(redis_server.url, "info", unique + "-missing").returncode == 1

    tail = dsgw(redis_server.url, "tail", unique, "--json")
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [json.loads(line["message"]) for line in lines] == [{"a": 1}, {"b": 2}, {"c": 3}, "bye"]
    from_second = dsgw(redis_server.url, "tail", unique, "--from", lines[1]["offset"])
    assert [line.split("  ", 1)[1] for line in from_second.stdout.splitlines()] == ['{"c":3}', '"bye"']


def test_tail_follow_prints_new_messages(gateway, redis_server, unique):
    url = gateway.stream_url(unique)
    with httpx.Client() as http:
        http.put(url, headers={"content-type": "text/plain"}, content=b"first")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "tail", unique, "--follow"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": redis_server.url},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().rstrip().endswith("first")
            http.post(url, headers={"content-type": "text/plain"}, content=b"second")
            assert proc.stdout.readline().rstrip().endswith("second")
        finally:
            proc.terminate()
            proc.wait(10)
