"""The state file of a running `dsgw dev` (DATA_DIR/dev.json): the URLs it chose.

`dsgw dev` writes it once everything is up and removes it when it stops; the
other `dsgw` commands read it when REDIS_URL / DATABASE_URL are unset, so
`dsgw streams` finds the instance `make run` just started. A file left behind by
a killed `dsgw dev` is ignored: its pid no longer runs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "dev.json"
DEFAULT_DATA_DIR = "data"


def data_dir_from_env() -> Path:
    """DSGW_DATA_DIR, else ./data: where `dsgw dev` keeps its data and state."""
    return Path(os.environ.get("DSGW_DATA_DIR", "").strip() or DEFAULT_DATA_DIR)


@dataclass
class DevState:
    pid: int
    base_url: str
    redis_url: str
    database_url: str = ""
    # Worker name -> its /metrics URL (the ports change when a worker restarts).
    worker_metrics: dict[str, str] = field(default_factory=dict)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def write(data_dir: Path, state: DevState) -> Path:
    """Replace the state file atomically (readers never see half a file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read(data_dir: Path) -> DevState | None:
    """The state of the `dsgw dev` running from `data_dir`, None if none runs."""
    try:
        raw = json.loads((data_dir / STATE_FILE).read_text())
        state = DevState(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return state if pid_alive(state.pid) else None


def remove(data_dir: Path, pid: int) -> None:
    """Remove the state file if it is `pid`'s (never another instance's)."""
    path = data_dir / STATE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
