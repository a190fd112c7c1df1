"""README's Quickstart, run literally in a fresh clone: `make run` (venv and
install included), every command of the second block, redis-cli as the
"Redis by hand" section shows it, then Ctrl-C. The commands are read from
README.md itself, so the README cannot drift from what works.

Only the ports differ from the README (free ones, so a developer's own
`make run` on 4437 does not matter): PORT, DSGW_DEV_REDIS_PORT and
DSGW_DEV_POSTGRES_PORT are set, and the commands are rewritten to match."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gateway.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
README_PORTS = {"4437": "PORT", "6390": "DSGW_DEV_REDIS_PORT", "6391": "DSGW_DEV_POSTGRES_PORT"}


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def bash_blocks(section: str) -> list[list[str]]:
    """The commands of each ```bash block: continuations joined, comments dropped."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        commands, current = [], ""
        for line in block.splitlines():
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            command = re.sub(r"\s+#[^'\"]*$", "", current).strip()
            if command:
                commands.append(command)
            current = ""
        blocks.append(commands)
    return blocks


def with_ports(command: str, ports: dict[str, str]) -> str:
    for old, new in ports.items():
        command = re.sub(rf"\b{old}\b", new, command)
    return command


@pytest.fixture
def clone() -> Path:
    """A fresh clone of this checkout's HEAD, in a directory Postgres (run as
    `nobody` when we are root) can reach."""
    base = Path(tempfile.mkdtemp(prefix="dsgw-quickstart-"))
    base.chmod(0o755)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(base / "repo")], check=True)
    yield base / "repo"
    shutil.rmtree(base, ignore_errors=True)


def test_readme_quickstart_in_a_fresh_clone(clone: Path) -> None:
    first, second = bash_blocks(readme_section("Quickstart"))
    assert first[0] == "make run"
    ports = {old: str(free_port()) for old in README_PORTS}
    # As a user's shell would run it: no Redis/Postgres of ours, and not as a
    # sub-make of `make e2e` (which would print "Entering directory" first).
    outside = ("REDIS_URL", "DATABASE_URL", "DSGW_DATA_DIR", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if k not in outside}
    env.update({README_PORTS[old]: new for old, new in ports.items()})

    started = time.monotonic()
    stderr_path = clone.parent / "make-run.stderr"
    make = subprocess.Popen(
        ["make", "run"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("wb"),
        text=True,
        start_new_session=True,  # Ctrl-C goes to the whole foreground group
    )
    try:
        assert make.stdout is not None
        first_line = make.stdout.readline()
        to_base_url = time.monotonic() - started
        # Nothing before the base URL: no warnings from the install or the servers.
        assert first_line == f"BASE_URL=http://127.0.0.1:{ports['4437']}\n", stderr_path.read_text()
        assert stderr_path.read_text() == ""
        print(f"first run: BASE_URL after {to_base_url:.1f} s")
        summary = [first_line]
        for line in make.stdout:
            summary.append(line)
            if line.startswith("try:"):
                break
        assert any(line.startswith("REDIS_URL=") for line in summary)
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{ports['4437']}/readyz"], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline and make.poll() is None, stderr_path.read_text()
            time.sleep(0.2)

        outputs = {}
        for command in second:
            command = with_ports(command, ports)
            for _attempt in range(50):  # the sink's row may take a moment to reach Postgres
                result = subprocess.run(
                    ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=60
                )
                if not command.startswith("psql") or "chat/room-1" in result.stdout:
                    break
                time.sleep(0.2)
            outputs[command.split()[0] + ":" + str(len(outputs))] = result
            if command.startswith("psql") and shutil.which("psql") is None:
                continue  # no psql client on this machine: the row is checked through dsgw tail above
            # curl --max-time ends the live read with 28 on purpose.
            assert result.returncode in ((0, 28) if "--max-time" in command else (0,)), (command, result)

        texts = [r.stdout for r in outputs.values()]
        put, post, catch_up, live, tail, psql = texts
        assert put.startswith("HTTP/1.1 201")
        assert post.startswith("HTTP/1.1 204")
        assert catch_up.startswith("HTTP/1.1 200") and '"text":"hi"' in catch_up
        assert "event: data" in live and '"text":"hi"' in live
        assert '"message":{"type":"message","key":"m1"' in tail
        if shutil.which("psql"):
            assert "chat/room-1" in psql and "alice" in psql

        # "Redis by hand": the README's XRANGE returns the message as it shows it.
        redis_cli = shutil.which("redis-cli") or str(clone / ".venv/bin/redis-cli")
        xrange = next(c for c in bash_blocks(readme_section("Redis by hand (redis-cli)"))[0] if " - +" in c)
        result = subprocess.run(
            ["bash", "-c", with_ports(xrange, ports).replace("redis-cli", redis_cli, 1)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "alice" in result.stdout, (xrange, result)
    finally:
        # Ctrl-C: SIGINT to the foreground process group.
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)
        try:
            make.wait(60)
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGKILL)
    assert not (clone / "data" / "dev.json").exists()  # a clean stop removes the state file
    assert (clone / "data" / "redis").is_dir()  # ... and keeps the data
