"""What a newcomer copies from the README and the Makefile works: redis-cli keys
name the right shard, `make help` shows every target, `make run` installs only
what running needs, and the package metadata builds without warnings."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from gateway import __version__
from gateway.keys import shard_tag, stream_keys

ROOT = Path(__file__).resolve().parents[2]


def test_readme_redis_keys_name_the_streams_shard() -> None:
    readme = (ROOT / "README.md").read_text()
    keys = re.findall(r"'ds:(\{\w+\}):([^':]+):(\w+)'", readme)
    assert keys, "no redis-cli key examples in README.md"
    for tag, name, _suffix in keys:
        assert tag == shard_tag(stream_keys(name).shard), (
            f"{name} lives in {shard_tag(stream_keys(name).shard)}"
        )
    for tag in re.findall(r"'dsfeed:(\{\w+\})'", readme):
        assert tag == shard_tag(stream_keys("chat/room-1").shard)


def test_readme_quickstart_curls_show_the_response() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart") : readme.index("## Architecture")]
    curls = [line for line in quickstart.splitlines() if line.startswith("curl ")]
    assert len(curls) >= 4
    for line in curls:
        assert "-i " in line or "-N " in line, f"a curl that prints nothing on success: {line}"


def test_make_help_lists_every_documented_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    documented = re.findall(r"^([A-Za-z0-9_-]+):.*## ", makefile, re.M)
    assert "e2e" in documented and "image" in documented
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    listed = [line.split()[1] for line in shown.splitlines() if line.strip().startswith("make ")]
    assert listed == documented


def test_make_run_installs_only_what_running_needs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    run_rule = re.search(r"^run: (.*?)##", makefile, re.M)
    assert run_rule and run_rule.group(1).split() == ["$(RUN_STAMP)"]
    stamp_rule = makefile[makefile.index("$(RUN_STAMP): ") :].split("\n\n", 1)[0]
    assert "'.[embedded]'" in stamp_rule and "test" not in stamp_rule
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(tool in " ".join(extras["embedded"]) for tool in ("ruff", "mypy", "pytest"))


def test_package_metadata_is_current_setuptools() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # A table here makes setuptools >= 77 print a deprecation warning on every install.
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["version"] == __version__
    # Data-only directories (gateway/lua, workers/sql) must be found as packages.
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["gateway*", "workers*"]
