"""The `dsgw` command.

Every expected failure (Redis or Postgres unreachable, a missing table or
stream, a bad option, Ctrl-C) ends with one line on stderr and a non-zero exit
code; tracebacks are kept for bugs. Without REDIS_URL / DATABASE_URL the
commands use the instance `dsgw dev` (make run) is running from DSGW_DATA_DIR
(its DATA_DIR/dev.json)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer

from . import __version__

app = typer.Typer(
    help="ds-gateway: Durable Streams on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


class CliError(Exception):
    """An expected failure: one line on stderr, exit code 1."""


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


# --- where Redis and Postgres are --------------------------------------------------

# The URLs this command uses, for error messages.
_using: dict[str, str] = {}


def masked(url: str) -> str:
    """`url` with its password replaced by ***, for messages and listings."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def dev_urls() -> tuple[str, str, str]:
    """(redis_url, database_url, where) of the `dsgw dev` running from the data
    dir, empty strings when none runs."""
    from . import devstate

    data_dir = devstate.data_dir_from_env()
    state = devstate.read(data_dir)
    if state is None:
        return "", "", str(data_dir / devstate.STATE_FILE)
    return state.redis_url, state.database_url, str(data_dir / devstate.STATE_FILE)


def _url(env: str, index: int, what: str) -> str:
    url = os.environ.get(env, "").strip() or dev_urls()[index]
    if not url:
        from .devstate import data_dir_from_env

        raise CliError(
            f"{env} is not set and no `dsgw dev` runs from {data_dir_from_env()}/"
            f" (start one with `make run`, or export {env} for your {what})"
        )
    _using[what] = url
    return url


def redis_url() -> str:
    return _url("REDIS_URL", 0, "Redis")


def database_url() -> str:
    return _url("DATABASE_URL", 1, "Postgres")


async def _target():  # type: ignore[no-untyped-def]
    """A connection to Redis (a RedisTarget: client and mux)."""
    from .redis_client import connect

    return await connect(redis_url(), max_connections=8, name=f"dsgw-cli-{os.getpid()}")


async def _postgres():  # type: ignore[no-untyped-def]
    import asyncpg

    return await asyncpg.connect(database_url(), timeout=10)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with Redis and Postgres failures turned into one-line CliErrors."""
    import asyncio

    import asyncpg
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeout

    from .layout import LayoutMismatch
    from .protocol import ProblemError

    redis_at = lambda: masked(_using.get("Redis", "?"))  # noqa: E731
    pg_at = lambda: masked(_using.get("Postgres", "?"))  # noqa: E731
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise  # stdout closed (`dsgw tail x | head`): not a connection problem
    except (RedisConnectionError, RedisTimeout) as exc:
        raise CliError(f"cannot reach Redis at {redis_at()}: {exc}") from None
    except RedisError as exc:
        raise CliError(f"Redis at {redis_at()} answered: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise CliError(f"Postgres at {pg_at()}: {exc}") from None
    except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        # Redis connections are made first by every command that uses both.
        where = f"Postgres at {pg_at()}" if "Postgres" in _using else f"Redis at {redis_at()}"
        raise CliError(f"cannot reach {where}: {exc or type(exc).__name__}") from None
    except ProblemError as exc:
        raise CliError(f"{exc.title}{': ' + exc.detail if exc.detail else ''}") from None
    except LayoutMismatch as exc:
        raise CliError(f"refusing to start: {exc}") from None


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
    _run(run_sink(settings))


@worker_app.command("source")
def worker_source() -> None:
    """Postgres -> stream: append changes of published tables as STATE-PROTOCOL messages."""
    from workers.source import run_source

    from . import logs

    settings = _worker_settings()
    logs.setup(os.environ.get("DSGW_LOG_LEVEL", "INFO"))
    _run(run_source(settings))


# --- Postgres ------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Apply the schema migrations in workers/sql/ to DATABASE_URL."""
    from workers.migrate import migrate as apply

    async def run() -> list[str]:
        conn = await _postgres()
        try:
            return await apply(conn)
        finally:
            await conn.close()

    applied = _run(run())
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.command()
def publish(
    table: str = typer.Argument(..., help="Table to publish, e.g. todos or app.todos."),
    stream: str = typer.Option(..., "--stream", help="Stream that receives the changes."),
) -> None:
    """Publish every committed change of TABLE to STREAM (idempotent)."""
    from workers.migrate import migrate as apply
    from workers.source import publish as install

    async def run() -> list[str]:
        conn = await _postgres()
        try:
            await apply(conn)
            return await install(conn, table, stream)
        finally:
            await conn.close()

    try:
        key_columns = _run(run())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # The source worker creates the stream too; creating it now lets readers attach at once.
    if os.environ.get("REDIS_URL") or dev_urls()[0]:
        _run(_create_json_stream(stream))
    typer.echo(f"publishing {table} (key: {', '.join(key_columns)}) to {stream}")


async def _create_json_stream(name: str) -> None:
    from .settings import Settings
    from .store import Store

    target = await _target()
    try:
        store = Store(
            target.mux, publish_command=target.publish_command, sink_filter=Settings.from_env().sink_filter
        )
        await store.create_json_stream(name)
    finally:
        await target.close()


@app.command()
def unpublish(table: str = typer.Argument(..., help="Table to stop publishing.")) -> None:
    """Stop publishing TABLE (the stream and its messages stay)."""
    from workers.source import unpublish as remove

    async def run() -> None:
        conn = await _postgres()
        try:
            await remove(conn, table)
        finally:
            await conn.close()

    try:
        _run(run())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    typer.echo(f"stopped publishing {table}")


# --- subscription keys ---------------------------------------------------------------


@app.command("rotate-keys")
def rotate_keys_command(
    which: str = typer.Argument(..., help="signing (webhook Ed25519 key) or token (callback-token key)."),
    publish_ahead: int = typer.Option(
        300, "--publish-ahead", min=1, help="Seconds the new key is published before it signs."
    ),
    keep: int = typer.Option(3 * 3600, "--keep", min=1, help="Seconds a superseded key stays published."),
) -> None:
    """Add a new webhook signing or callback-token key (gateway/subscriptions/signing.py): every
    replica publishes it first, signs with it after --publish-ahead seconds; keys superseded more
    than --keep seconds ago are dropped."""
    from .settings import Settings
    from .subscriptions.signing import rotate_keys

    if which not in ("signing", "token"):
        raise CliError("rotate-keys takes signing or token")
    refresh_s = Settings.from_env().webhook_keys_refresh_s
    if publish_ahead <= refresh_s:
        raise CliError(f"--publish-ahead must exceed DSGW_WEBHOOK_KEYS_REFRESH_S ({refresh_s} s)")

    async def run():  # type: ignore[no-untyped-def]
        target = await _target()
        try:
            return await rotate_keys(target.client, which, publish_ahead_s=publish_ahead, keep_s=keep)
        finally:
            await target.close()

    key = _run(run())
    typer.echo(f"{which} key {key.kid} added; it signs from {key.active_from} (unix time)")


# --- inspection ----------------------------------------------------------------------


def _print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


def _print_rows(headers: list[str], rows: list[list[str]], title: str = "") -> None:
    """A table on a terminal; tab-separated lines (nothing cut) when piped."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, title=title or None)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    for row in [headers, *rows]:
        typer.echo("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))


@app.command()
def streams(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the streams: name, content type, messages, bytes, closed, TTL (tab-separated when piped)."""
    from .inspect import list_streams

    async def run() -> list[dict]:
        target = await _target()
        try:
            return await list_streams(target.client)
        finally:
            await target.close()

    rows = _run(run())
    if as_json:
        _print_json(rows)
        return
    table = []
    for r in rows:
        state = "yes" if r["closed"] else ("deleted" if r["deleted"] else "")
        expiry = f"{r['ttl']} s" if r["ttl"] is not None else (r["expires_at"] or "")
        table.append([r["name"], r["content_type"], str(r["messages"]), str(r["bytes"]), state, expiry])
    _print_rows(["name", "content type", "messages", "bytes", "closed", "ttl / expires"], table)


@app.command()
def subscriptions(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the subscriptions (issue 12): type, target, wake state, and each linked stream's cursor."""
    from .subscriptions.listing import list_subscriptions

    async def run() -> list[dict]:
        target = await _target()
        try:
            return await list_subscriptions(target.mux)
        finally:
            await target.close()

    rows = _run(run())
    if as_json:
        _print_json(rows)
        return
    table = []
    for r in rows:
        wake = (
            f"gen {r['generation']}"
            + (f" {r['wake_id']}" if r["wake_id"] else "")
            + (f" held by {r['holder']}" if r["holder"] else "")
        )
        table.append([r["id"], r["type"], r["pattern"] or "", r["target"], wake, r["status"], ""])
        for s in r["streams"]:
            table.append(
                [
                    "",
                    "",
                    "",
                    f"  {s['path']} ({s['link']})",
                    f"acked {s['acked']}",
                    "",
                    f"tail {s['tail'] or '?'}",
                ]
            )
    _print_rows(["id", "type", "pattern", "target / stream", "wake / cursor", "status", "tail"], table)


@app.command()
def info(
    name: str = typer.Argument(..., help="Stream name, e.g. chat/room-1."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A stream's state: metadata, producers (epoch, seq), forks, sink lag, Redis keys."""
    from .inspect import stream_info

    async def run() -> dict | None:
        target = await _target()
        try:
            return await stream_info(target.client, name)
        finally:
            await target.close()

    data = _run(run())
    if data is None:
        raise CliError(f"no stream named {name}")
    if as_json:
        _print_json(data)
        return
    overview = []
    for field in ("content_type", "tail_offset", "messages", "bytes", "closed", "deleted", "ttl", "expires_at",
                  "forked_from", "fork_offset", "stream_seq", "synced_to_postgres"):  # fmt: skip
        overview.append([field, "" if data[field] is None else str(data[field])])
    overview.append(["forks", ", ".join(data["forks"])])
    for label, key in (("hot range (Redis)", "hot_range"), ("cold range (Postgres)", "cold_range")):
        span = data[key]
        overview.append([label, f"{span['from']} .. {span['to']}" if span else "(none)"])
    if data["sink"]:
        overview.append(["sink backlog (shard)", str(data["sink"].get("backlog"))])
        overview.append(["sink oldest age ms", str(data["sink"].get("oldest_age_ms"))])
    for label, key in data["keys"].items():
        overview.append([f"key: {label}", key])
    _print_rows(["field", "value"], overview, title=f"stream {name}")
    producers = []
    for p in data["producers"]:
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p["updated_ms"] / 1000))
        producers.append([p["id"], str(p["epoch"]), str(p["seq"]), updated])
    if producers or sys.stdout.isatty():
        _print_rows(["producer", "epoch", "seq", "updated"], producers, title="producers")


@app.command()
def tail(
    name: str = typer.Argument(..., help="Stream name."),
    from_offset: str = typer.Option(
        "-1", "--from", help="Start after this offset: -1 the beginning, now only new messages."
    ),
    lines: int = typer.Option(None, "-n", "--lines", min=0, help="Start with the last N messages."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep waiting for new messages."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='NDJSON: one {"offset", "message"} object per line, JSON messages as JSON values.',
    ),
) -> None:
    """Print a stream's messages (JSON as text, text as is, binary as base64), one per line."""
    from .inspect import NOW
    from .inspect import tail as read_tail
    from .offsets import ZERO_ID, BadOffset, parse_offset

    start: Any
    if from_offset == "-1":
        start = ZERO_ID
    elif from_offset == "now":
        start = NOW
    else:
        try:
            start = parse_offset(from_offset)
        except BadOffset:
            raise typer.BadParameter(
                f"{from_offset!r} is not an offset (use -1, now, or an offset dsgw tail printed)",
                param_hint="--from",
            ) from None
    if lines is not None and from_offset != "-1":
        raise typer.BadParameter("use either -n or --from, not both", param_hint="-n")

    async def run() -> None:
        target = await _target()
        try:
            async for message in read_tail(target, name, start, follow=follow, last=lines):
                typer.echo(message.ndjson() if as_json else f"{message.offset}  {message.text}")
        finally:
            await target.close()

    _run(run())


# --- configuration -------------------------------------------------------------------


@app.command()
def reshard(
    to: int = typer.Option(..., "--to", min=1, max=16384, help="The new shard count (DSGW_SHARDS)."),
    drop_feeds: bool = typer.Option(
        False, "--drop-feeds", help="Discard sync feed entries no sink has acknowledged (no sink runs)."
    ),
) -> None:
    """Move every stream to the shards of another shard count. Offline: stop every gateway and
    worker first (after the sink drained the feeds); rerun it if it is interrupted."""
    from .reshard import ReshardError
    from .reshard import reshard as move

    async def run():  # type: ignore[no-untyped-def]
        target = await _target()
        try:
            return await move(target.client, to, drop_feeds=drop_feeds, progress=typer.echo)
        finally:
            await target.close()

    try:
        report = _run(run())
    except ReshardError as exc:
        raise CliError(str(exc)) from None
    typer.echo(
        f"{report.source} -> {report.target}: moved {report.streams} streams ({report.keys} keys,"
        f" {report.members} deadlines and wake-ups) in {report.seconds:.1f} s; now start with DSGW_SHARDS={to}"
    )


@app.command("check-config")
def check_config(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the effective settings and what is wrong with them (Redis and Postgres
    included); exit code 1 when something is."""
    from .configcheck import check

    report = _run(check(masked))
    if as_json:
        _print_json(report)
    else:
        for section in ("gateway", "workers", "dev"):
            typer.echo(f"[{section}]")
            for key, value in report["settings"][section].items():
                typer.echo(f"  {key} = {value}")
            if not report["settings"][section]:
                typer.echo("  (unreadable: see the problems below)")
        if report["problems"]:
            typer.echo("problems:")
            for problem in report["problems"]:
                typer.echo(f"  {problem['level']}: {problem['message']}")
        errors = sum(1 for p in report["problems"] if p["level"] == "error")
        warnings = len(report["problems"]) - errors
        typer.echo(f"{errors} error(s), {warnings} warning(s)" if report["problems"] else "ok")
    if any(p["level"] == "error" for p in report["problems"]):
        raise typer.Exit(1)


# --- auth: development tokens and API keys ------------------------------------------------


@app.command()
def token(
    read: list[str] = typer.Option([], "--read", help="Glob of streams it may read (repeatable)."),
    append: list[str] = typer.Option([], "--append", help="Glob of streams it may append to."),
    manage: list[str] = typer.Option([], "--manage", help="Glob of streams it may create, fork, delete."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime: 45s, 30m, 1h, 7d."),
    sub: str = typer.Option("dev", "--sub", help="Subject (rate limits count per subject)."),
    api_key: str = typer.Option(
        "", "--api-key", metavar="NAME", help="Instead: a new API key and its DSGW_AUTH_KEYS_FILE entry."
    ),
) -> None:
    """Mint a development HS256 token from DSGW_AUTH_JWT_SECRET (globs: `*` stays
    within one path segment, `**` crosses `/`), or a new API key."""
    import json

    from .auth import dev_token, new_api_key, parse_duration
    from .settings import Settings

    ds = {op: globs for op, globs in (("read", read), ("append", append), ("manage", manage)) if globs}
    if not ds:
        raise CliError("grant something: --read, --append and/or --manage GLOB")
    if api_key:
        key, entry = new_api_key(api_key, ds)
        typer.echo(key)
        typer.echo(f"add to the keys list of DSGW_AUTH_KEYS_FILE: {json.dumps(entry)}", err=True)
        return
    try:
        typer.echo(dev_token(Settings.from_env(), ds, parse_duration(ttl), sub))
    except ValueError as exc:
        raise CliError(str(exc)) from None


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
