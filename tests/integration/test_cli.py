"""The dsgw commands against a real Redis (and Postgres) holding real streams:
what they print, piped as in a script, and how they fail."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import httpx
import redis

from gateway import __version__
from gateway.embedded import free_port
from gateway.keys import stream_keys
from tests.conftest import ROOT


def dsgw(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dsgw: ")
    return lines[0]


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

    info = json.loads(dsgw(redis_server.url, "info", unique, "--json").stdout)
    assert info["producers"][0]["id"] == "ai" and (
        info["producers"][0]["epoch"],
        info["producers"][0]["seq"],
    ) == (3, 1)
    assert info["forks"] == [unique + "-fork"]
    assert info["tail_offset"] == http.head(url).headers["stream-next-offset"]
    assert info["keys"]["data"].endswith(f":{unique}:data")
    assert one_line_error(dsgw(redis_server.url, "info", unique + "-missing")) == (
        f"dsgw: no stream named {unique}-missing"
    )

    # --json is NDJSON: each message a JSON value (not a JSON string inside JSON).
    tail = dsgw(redis_server.url, "tail", unique, "--json")
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [line["message"] for line in lines] == [{"a": 1}, {"b": 2}, {"c": 3}, "bye"]
    from_second = dsgw(redis_server.url, "tail", unique, "--from", lines[1]["offset"])
    assert [line.split("  ", 1)[1] for line in from_second.stdout.splitlines()] == ['{"c":3}', '"bye"']
    last_two = dsgw(redis_server.url, "tail", unique, "-n", "2")
    assert [line.split("  ", 1)[1] for line in last_two.stdout.splitlines()] == ['{"c":3}', '"bye"']
    assert len(dsgw(redis_server.url, "tail", unique, "-n", "10").stdout.splitlines()) == 4
    assert dsgw(redis_server.url, "tail", unique, "-n", "0").stdout == ""
    # The fork: its whole history is inherited, -n walks it.
    fork_last = dsgw(redis_server.url, "tail", unique + "-fork", "-n", "1", "--json")
    assert [json.loads(line)["message"] for line in fork_last.stdout.splitlines()] == ["bye"]


def test_piped_tables_keep_long_names(gateway, redis_server, http, unique):
    long_name = f"{unique}/" + "a-rather-long-segment-" * 6 + "end"
    http.put(gateway.stream_url(long_name), headers={"content-type": "text/plain"})
    out = dsgw(redis_server.url, "streams").stdout.splitlines()
    assert out[0].split("\t") == ["name", "content type", "messages", "bytes", "closed", "ttl / expires"]
    assert [long_name, "text/plain", "0", "0", "", ""] in [line.split("\t") for line in out]
    info = dsgw(redis_server.url, "info", long_name).stdout.splitlines()
    assert ["key: data", stream_keys(long_name).data] in [line.split("\t") for line in info]


def test_tail_json_keeps_digits_and_one_line_per_message(gateway, redis_server, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "application/json"})
    http.post(
        url,
        headers={"content-type": "application/json"},
        content=b'{"n": 12345678901234567890123,\n "t": "a\\nb"}',
    )
    http.put(gateway.stream_url(unique + "-bin"), headers={"content-type": "application/octet-stream"})
    http.post(
        gateway.stream_url(unique + "-bin"),
        headers={"content-type": "application/octet-stream"},
        content=b"\x00\xff",
    )
    (line,) = dsgw(redis_server.url, "tail", unique, "--json").stdout.splitlines()
    assert "12345678901234567890123" in line
    assert json.loads(line)["message"] == {"n": 12345678901234567890123, "t": "a\nb"}
    (binary,) = dsgw(redis_server.url, "tail", unique + "-bin", "--json").stdout.splitlines()
    assert {k: v for k, v in json.loads(binary).items() if k != "offset"} == {
        "message": "AP8=",
        "encoding": "base64",
    }


def test_tail_follow_prints_new_messages_and_ctrl_c_is_quiet(gateway, redis_server, unique):
    url = gateway.stream_url(unique)
    with httpx.Client() as http:
        http.put(url, headers={"content-type": "text/plain"}, content=b"first")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "tail", unique, "--follow"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": redis_server.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().rstrip().endswith("first")
            http.post(url, headers={"content-type": "text/plain"}, content=b"second")
            assert proc.stdout.readline().rstrip().endswith("second")
            time.sleep(5.5)  # past one 5 s block of the follow loop
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130
    assert err == ""


def test_tail_from_now_prints_only_new_messages(gateway, redis_server, unique):
    url = gateway.stream_url(unique)
    with httpx.Client() as http:
        http.put(url, headers={"content-type": "text/plain"}, content=b"old")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "tail", unique, "--from", "now", "-f"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": redis_server.url},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # It has read the tail once it blocks in XREAD on the stream (an
            # append before that would count as "old"): wait for that, not a while.
            client = redis.Redis.from_url(redis_server.url)
            deadline = time.monotonic() + 30
            while not any(
                c["name"] == f"dsgw-cli-{proc.pid}" and c["cmd"] == "xread" for c in client.client_list()
            ):
                assert time.monotonic() < deadline, "dsgw tail never started following"
                time.sleep(0.05)
            client.close()
            http.post(url, headers={"content-type": "text/plain"}, content=b"new")
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "dsgw tail printed nothing"
            assert proc.stdout.readline().rstrip().endswith("  new")
        finally:
            proc.terminate()
            proc.wait(10)
    assert dsgw(redis_server.url, "tail", unique, "--from", "now").stdout == ""


def test_version():
    result = dsgw("", "--version")
    assert result.returncode == 0
    assert result.stdout == f"dsgw {__version__}\n"


def test_expected_failures_are_one_line(redis_server, postgres_server, unique):
    down = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["streams"], ["info", "x"], ["tail", "x"]):
        assert one_line_error(dsgw(down, *args)).startswith(f"dsgw: cannot reach Redis at {down}")
    assert one_line_error(dsgw(redis_server.url, "tail", f"{unique}-missing")) == "dsgw: Stream not found"
    assert "'nope' is not an offset" in one_line_error(
        dsgw(redis_server.url, "tail", "x", "--from", "nope"), 2
    )
    assert "No such command" in one_line_error(dsgw(redis_server.url, "nosuch"), 2)
    assert "REDIS_URL is not set" in one_line_error(dsgw("", "streams", DSGW_DATA_DIR=f"/tmp/{unique}-none"))
    missing_table = dsgw(
        redis_server.url,
        "publish",
        f"t_{unique.replace('-', '_')}",
        "--stream",
        "s",
        DATABASE_URL=postgres_server.url,
    )
    assert "does not exist" in one_line_error(missing_table)
    pg_down = dsgw(
        redis_server.url, "migrate", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    assert one_line_error(pg_down).startswith(
        "dsgw: cannot reach Postgres at postgresql://postgres@127.0.0.1:"
    )


def test_check_config(redis_server, postgres_server):
    env = {"DATABASE_URL": postgres_server.url, "DSGW_SINK_STREAM": "chat/*", "DSGW_SHARDS": "16"}
    result = dsgw(redis_server.url, "check-config", "--json", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["gateway"]["redis_url"] == redis_server.url
    assert report["settings"]["gateway"]["long_poll_timeout_ms"] == 30000
    assert report["settings"]["workers"]["database_url"] == postgres_server.url
    messages = [p["message"] for p in report["problems"]]
    assert any("DSGW_SINK_STREAM is set but" in m and "DSGW_SINK_STREAMS" in m for m in messages)
    assert any("appendonly no" in m for m in messages)  # the test Redis runs without persistence
    assert all(p["level"] == "warning" for p in report["problems"])

    bad = dsgw(
        f"redis://:secret@127.0.0.1:{free_port()}/0", "check-config",
        DSGW_LONG_POLL_TIMEOUT_MS="soon", DATABASE_URL=postgres_server.url,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "error: DSGW_LONG_POLL_TIMEOUT_MS='soon' is not a valid value" in bad.stdout
    assert "error: cannot reach Redis at redis://:***@127.0.0.1:" in bad.stdout
    assert "secret" not in bad.stdout


def test_tail_into_a_closed_pipe_is_quiet(gateway, redis_server, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "application/json"})
    batch = json.dumps([{"n": i, "pad": "x" * 100} for i in range(3000)])  # far more than a pipe buffer
    assert http.post(url, headers={"content-type": "application/json"}, content=batch).status_code == 204
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "tail", unique],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_server.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `dsgw tail NAME | head -1`
    err = proc.stderr.read()
    assert proc.wait(30) == 1
    assert err == b""
