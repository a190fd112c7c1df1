"""Running the gateway's HTTP server: uvicorn, one process or N.

With N processes each one binds the port itself with SO_REUSEPORT, so the
kernel spreads new connections evenly over them by hash. (uvicorn's own
`--workers` shares one listening socket, and its accept() race piles the
long-lived keep-alive connections of a client pool onto whichever process
wins it: 53 of 64 on one process was seen here, leaving a core idle.) The
parent only supervises: it forwards SIGTERM/SIGINT as SIGTERM (each process
drains), restarts a process that dies after it ran a while, and stops the
server when one dies at once (a startup failure: bad settings, no Redis) so
that it is reported instead of retried forever.

    python -m gateway.serve HOST PORT   one server process (what the parent starts)
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("dsgw.serve")

# A process that dies sooner than this after its start failed to start.
STARTUP_S = 10.0


def run_one(host: str, port: int, *, reuse_port: bool = False) -> None:
    """One uvicorn server in this process (SIGTERM drains it)."""
    import uvicorn

    config = uvicorn.Config(
        "gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run(sockets=[_reuse_port_socket(host, port)] if reuse_port else None)
    if not server.started:
        sys.exit(3)  # uvicorn's own code for a failed startup


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run_supervised(host: str, port: int, workers: int) -> int:
    """N server processes on one port; returns the exit code for the CLI."""
    from . import logs
    from .embedded import die_with_parent
    from .metrics import process_exited
    from .settings import Settings

    logs.setup(Settings.from_env().log_level)

    # Bind once here first: a taken port is one clear error, before any child starts.
    _reuse_port_socket(host, port).close()
    command = [sys.executable, "-m", "gateway.serve", host, str(port)]
    procs: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False

    def start(slot: int) -> None:
        # Own process group (die_with_parent): a terminal's Ctrl-C reaches only
        # us, and we stop the children in order.
        procs[slot] = (subprocess.Popen(command, preexec_fn=die_with_parent), time.monotonic())

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        start(slot)
    code = 0
    while procs:
        time.sleep(0.2)
        for slot, (proc, started) in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[slot]
            process_exited(proc.pid)
            if stopping:
                continue
            if time.monotonic() - started < STARTUP_S:
                log.error(
                    "a gateway process failed to start: stopping", extra={"fields": {"exit": proc.returncode}}
                )
                code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("a gateway process died: restarting it", extra={"fields": {"exit": proc.returncode}})
            start(slot)
    return code


if __name__ == "__main__":
    # A child of run_supervised: SIGTERM after a clean drain exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_one(sys.argv[1], int(sys.argv[2]), reuse_port=True)
