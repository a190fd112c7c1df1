"""Tools the tests and scripts need from Debian's packages (nginx, wrk,
chromium, redis-tools): found on PATH or in the usual places, else installed
with apt-get (as root, as on the development and CI machines), so nothing
needs installing by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def debian_binary(name: str, package: str, paths: tuple[str, ...] = ()) -> str | None:
    """The path of `name` (PATH first, then `paths`); when missing, installs
    `package` with apt-get (running `apt-get update` once if the first try
    fails) and looks again. None if it still is not there."""

    def find() -> str | None:
        return shutil.which(name) or next((p for p in paths if os.access(p, os.X_OK)), None)

    found = find()
    if found:
        return found
    print(f"{name} not found: installing Debian's {package} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    return find()
