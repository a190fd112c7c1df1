"""The `dsgw` command: the typer app, running (serve, dev, worker) and the entry
point; the other commands live in cli_postgres, cli_keys, cli_inspect and
cli_admin, what they share in cli_support.

Every expected failure (Redis or Postgres unreachable, a missing table or
stream, a bad option, Ctrl-C) ends with one line on stderr and a non-zero exit
code; tracebacks are kept for bugs. Without REDIS_URL / DATABASE_URL the
commands use the instance `dsgw dev` (make run) is running from DSGW_DATA_DIR
(its DATA_DIR/dev.json)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from . import __version__, cli_admin, cli_inspect, cli_keys, cli_postgres
from .cli_support import CliError, database_url, redis_url, run_async

app = typer.Typer(
    help="ds-gateway: Durable Streams on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsgw {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ds-gateway: Durable Streams on Redis Streams, synced with Postgres."""


# --- running -------------------------------------------------------------------------


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4437, help="Port to listen on."),
    workers: int = typer.Option(1, help="Gateway processes sharing the port."),
) -> None:
    """Run the gateway (REDIS_URL must name a running Redis)."""
    from .settings import Settings

    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a bad setting: one line, not a traceback
        raise CliError(f"configuration error: {exc}") from None
    if not settings.redis_url:
        raise CliError("REDIS_URL is not set (use `dsgw dev` for an embedded Redis)")
    _exit_zero_after_drain()
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # One /metrics for all worker processes (see gateway/metrics.py).
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dsgw-metrics-")
    try:
        _run_uvicorn(host, port, workers)
    finally:
        if metrics_dir:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_uvicorn(host: str, port: int, workers: int) -> None:
    from .serve import run_one, run_supervised

    if workers > 1:
        # One process per worker, each on its own SO_REUSEPORT socket (gateway/serve.py).
        code = run_supervised(host, port, workers)
        if code:
            raise typer.Exit(code)
        return
    run_one(host, port)


def _exit_zero_after_drain() -> None:
    """uvicorn drains on SIGTERM, then re-raises the signal, which would end the
    process as killed by it; a clean drain should exit 0 instead (and run the
    callers' `finally` blocks)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4437, help="Port to listen on."),
    data_dir: Path = typer.Option(
        Path("data"), envvar="DSGW_DATA_DIR", help="Where embedded servers keep data."
    ),
    workers: bool = typer.Option(True, help="Also run one sink and one source worker."),
) -> None:
    """Run everything on one machine: the gateway, one sink and one source
    worker, plus an embedded Redis (AOF on, DATA_DIR/redis) when REDIS_URL is
    not set and an embedded Postgres (DATA_DIR/pg) when DATABASE_URL is not set.
    Refuses to start when a port it needs is taken; restarts a child that dies.
    Ctrl-C stops it all; the data stays for the next run."""
    from . import devstate
    from .dev import Supervisor, current_state, plan_from_env, start_all

    _exit_zero_after_drain()
    say = lambda message: typer.echo(message, err=True)  # noqa: E731
    supervisor = Supervisor(say=say)
    try:
        plan = plan_from_env(host, port, data_dir, workers)
        state = start_all(plan, supervisor)
        supervisor.on_restart = lambda: devstate.write(plan.data_dir, current_state(plan, supervisor))
        state_path = devstate.write(plan.data_dir, state)
        _print_dev_summary(state, plan.data_dir, state_path)
        supervisor.run_in_background()
        _run_uvicorn(host, port, workers=1)
    finally:
        supervisor.stop()
        devstate.remove(data_dir.resolve(), os.getpid())


def _print_dev_summary(state: Any, data_dir: Path, state_path: Path) -> None:
    typer.echo(f"BASE_URL={state.base_url}")
    typer.echo(f"REDIS_URL={state.redis_url}")
    if state.database_url:
        typer.echo(f"DATABASE_URL={state.database_url}")
        metrics = ", ".join(f"{k} {v}" for k, v in state.worker_metrics.items())
        typer.echo(f"workers:  sink and source, logs in {data_dir}/{{sink,source}}.log; metrics: {metrics}")
    typer.echo(f"state:    {state_path} (dsgw streams / info / tail / publish find this instance there)")
    typer.echo(f"inspect:  redis-cli -u {state.redis_url} --scan --pattern 'ds:*:meta'")
    typer.echo(
        f"try:      curl -i -X PUT -H 'content-type: application/json' {state.base_url}/v1/stream/hello"
    )
    if os.environ.get("DSGW_AUTH_JWT_SECRET"):
        typer.echo("auth:     on; a token: dsgw token --read '**' --append '**' --manage '**' --ttl 1h")
    else:
        typer.echo("auth:     off; turn on: DSGW_AUTH_JWT_SECRET=$(openssl rand -hex 32) make run")


# The other commands, one module per concern; `dsgw --help` lists them in this
# order after serve and dev (the worker group last).
for _module in (cli_postgres, cli_keys, cli_inspect, cli_admin):
    app.add_typer(_module.commands)

worker_app = typer.Typer(help="Postgres sync workers.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")


def _worker_settings():  # type: ignore[no-untyped-def]
    from workers.settings import WorkerSettings

    # Fill in a running `dsgw dev`'s URLs, so a hand-started worker joins it.
    os.environ["REDIS_URL"], os.environ["DATABASE_URL"] = redis_url(), database_url()
    return WorkerSettings.from_env()


@worker_app.command("sink")
def worker_sink() -> None:
    """Stream -> Postgres: write every message of synced JSON streams to session_events."""
    from workers.sink import run_sink

    from . import logs

    settings = _worker_settings()
    logs.setup(os.environ.get("DSGW_LOG_LEVEL", "INFO"))
    run_async(run_sink(settings))


@worker_app.command("source")
def worker_source() -> None:
    """Postgres -> stream: append changes of published tables as STATE-PROTOCOL messages."""
    from workers.source import run_source

    from . import logs

    settings = _worker_settings()
    logs.setup(os.environ.get("DSGW_LOG_LEVEL", "INFO"))
    run_async(run_source(settings))


# --- entry point ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: expected failures end with one line on stderr, not a traceback."""
    from .dev import DevError
    from .embedded import EmbeddedError

    # click's exceptions, wherever this typer takes click from (newer ones vendor it).
    click = sys.modules[typer.BadParameter.__module__]
    no_args = getattr(click, "NoArgsIsHelpError", ())
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="dsgw", standalone_mode=False)
    except no_args as exc:  # type: ignore[misc]
        typer.echo(exc.format_message(), err=True)
        code = 2
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        typer.echo(f"dsgw: {exc.format_message()}{hint}", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        typer.echo(f"dsgw: {exc.format_message()}", err=True)
        code = exc.exit_code
    except (CliError, DevError, EmbeddedError) as exc:
        typer.echo(f"dsgw: {exc}", err=True)
        code = 1
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except BrokenPipeError:
        # The reader went away (`dsgw tail x | head -1`): stop quietly, and keep
        # Python from complaining when it flushes stdout on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
