"""examples/: a Python and a TypeScript chat participant, each with the official
client (PyPI durable-streams from the test extra; npm @durable-streams/client
from examples/package-lock.json, installed here), talk through a real gateway:
live delivery both ways, exactly-once sends, resume from the saved offset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"
TS_BUILD = EXAMPLES / "typescript" / "dist" / "chat-participant.js"


@pytest.fixture(scope="module")
def ts_participant() -> Path:
    """Install the pinned client from the lockfile and compile the TypeScript example."""
    npm = shutil.which("npm")
    assert npm, "npm is needed for the TypeScript example (Node 20+)"
    stamp = EXAMPLES / "node_modules" / ".installed-stamp"
    lock = EXAMPLES / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=EXAMPLES, check=True, timeout=600
        )
        stamp.touch()
    subprocess.run([npm, "run", "-s", "build"], cwd=EXAMPLES, check=True, timeout=300)
    return TS_BUILD


def python_participant(
    base_url: str, room: str, name: str, state: Path, *args: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "python" / "chat_participant.py"), base_url, room, name,
         "--state", str(state), "--timeout", "60", *args],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def ts_command(script: Path, base_url: str, room: str, name: str, state: Path, *args: str) -> list[str]:
    return ["node", str(script), base_url, room, name, "--state", str(state), "--timeout", "60", *args]


def messages(http: httpx.Client, url: str) -> list[dict]:
    return http.get(url, params={"offset": "-1"}).json()


def test_python_and_typescript_participants_chat(
    gateway, redis_server, http, unique, tmp_path, ts_participant
):
    room = f"chat/{unique}"
    url = gateway.stream_url(room)
    alice_state, bob_state = tmp_path / "alice.json", tmp_path / "bob.json"

    # Both say something and wait for the other's message, live (whoever starts first).
    bob = subprocess.Popen(
        ts_command(
            ts_participant, gateway.url, room, "bob", bob_state, "--say", "hi from ts", "--expect", "1"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    alice = python_participant(
        gateway.url, room, "alice", alice_state, "--say", "hi from python", "--expect", "1"
    )
    bob_out, bob_err = bob.communicate(timeout=90)
    assert alice.returncode == 0, alice.stderr
    assert bob.returncode == 0, bob_err
    assert alice.stdout == "bob: hi from ts\n"
    assert bob_out == "alice: hi from python\n"
    senders = [m["value"]["from"] for m in messages(http, url)]
    assert sorted(senders) == ["alice", "bob"]

    # Exactly once: alice crashed after sending but before saving her next seq;
    # the resend repeats (alice, epoch 0, seq 0) and the server drops it.
    saved = json.loads(alice_state.read_text())
    assert saved["seq"] == 1
    alice_state.write_text(json.dumps({**saved, "seq": 0}))
    resent = python_participant(gateway.url, room, "alice", alice_state, "--say", "hi from python")
    assert resent.returncode == 0, resent.stderr
    assert [m["value"]["from"] for m in messages(http, url)].count("alice") == 1

    # Resume: both come back after someone spoke; each prints only what is new.
    http.post(
        url,
        headers={"content-type": "application/json"},
        json={"type": "message", "key": "carol-0", "value": {"from": "carol", "text": "while you were away"}},
    )
    alice_again = python_participant(gateway.url, room, "alice", alice_state, "--expect", "1")
    assert alice_again.returncode == 0, alice_again.stderr
    assert alice_again.stdout == "carol: while you were away\n"
    bob_again = subprocess.run(
        ts_command(ts_participant, gateway.url, room, "bob", bob_state, "--say", "back", "--expect", "1"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert bob_again.returncode == 0, bob_again.stderr
    assert bob_again.stdout == "carol: while you were away\n"
    # A new run is a new producer epoch: its first seq is not mistaken for a duplicate.
    assert [m["value"]["text"] for m in messages(http, url) if m["value"]["from"] == "bob"] == [
        "hi from ts",
        "back",
    ]
    # Both sent as idempotent producers: the stream knows them by name.
    info = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "info", room, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": redis_server.url},
    )  # fmt: skip
    assert info.returncode == 0, info.stderr
    producers = {p["id"]: (p["epoch"], p["seq"]) for p in json.loads(info.stdout)["producers"]}
    assert producers == {"alice": (0, 0), "bob": (1, 0)}
