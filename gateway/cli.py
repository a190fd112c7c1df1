"""The `dsgw` command."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import typer

app = typer.Typer(help="ds-gateway: Durable Streams on Redis Streams.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """ds-gateway: Durable Streams on Redis Streams, synced with Postgres."""


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4437, help="Port to listen on."),
    workers: int = typer.Option(1, help="Gateway processes sharing the port."),
) -> None:
    """Run the gateway (REDIS_URL must name a running Redis)."""
    from .settings import Settings

    settings = Settings.from_env()
    if not settings.redis_url:
        raise typer.BadParameter("REDIS_URL is not set (use `dsgw dev` for an embedded Redis)")
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
    import uvicorn

    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )


def _exit_zero_after_drain() -> None:
    """uvicorn drains on SIGTERM, then re-raises the signal, which would end the
    process as killed by it; a clean drain should exit 0 instead."""
    import signal
    import sys

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
    Ctrl-C stops it all; the data stays for the next run."""
    import signal
    import subprocess
    import sys

    from .embedded import start_postgres, start_redis

    # uvicorn re-raises the SIGTERM it drained on; turn that into an exception
    # so that the `finally` below still stops the workers and servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    data_dir = data_dir.resolve()
    stop_last: list = []  # servers and workers, stopped in reverse order
    try:
        if not os.environ.get("REDIS_URL"):
            redis_proc = start_redis(
                data_dir / "redis",
                # Fixed ports keep the printed commands valid across restarts.
                port=int(os.environ.get("DSGW_DEV_REDIS_PORT", "6390")),
                persistent=True,
                path_min_version=(7, 0),
                log_file=data_dir / "redis.log",
            )
            stop_last.append(redis_proc)
            os.environ["REDIS_URL"] = redis_proc.url
        if workers and not os.environ.get("DATABASE_URL"):
            pg_proc = start_postgres(
                data_dir / "pg",
                port=int(os.environ.get("DSGW_DEV_POSTGRES_PORT", "6391")),
                log_file=data_dir / "postgres.log",
            )
            stop_last.append(pg_proc)
            os.environ["DATABASE_URL"] = pg_proc.url
        if workers:
            for kind in ("sink", "source"):
                log = open(data_dir / f"{kind}.log", "ab")  # noqa: SIM115
                child = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "worker", kind],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                stop_last.append(_Child(child))
        base_url = f"http://{host}:{port}"
        redis_url = os.environ["REDIS_URL"]
        typer.echo(f"BASE_URL={base_url}")
        typer.echo(f"REDIS_URL={redis_url}")
        if workers:
            typer.echo(f"DATABASE_URL={os.environ['DATABASE_URL']}")
            typer.echo(f"workers:  sink and source, logs in {data_dir}/{{sink,source}}.log")
        typer.echo(f"inspect:  redis-cli -u {redis_url} --scan --pattern 'ds:*:meta'")
        typer.echo(f"try:      curl -X PUT -H 'content-type: application/json' {base_url}/v1/stream/hello")
        _run_uvicorn(host, port, workers=1)
    finally:
        for proc in reversed(stop_last):
            proc.stop()


class _Child:
    """A worker child of `dsgw dev`: SIGTERM makes it drain and exit."""

    def __init__(self, proc) -> None:  # type: ignore[no-untyped-def]
        self.proc = proc

    def stop(self) -> None:
        from .embedded import stop_child

        stop_child(self.proc)


worker_app = typer.Typer(help="Postgres sync workers.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")


def _worker_settings():  # type: ignore[no-untyped-def]
    from workers.settings import WorkerSettings

    settings = WorkerSettings.from_env()
    if not settings.redis_url or not settings.database_url:
        raise typer.BadParameter("REDIS_URL and DATABASE_URL must be set")
    return settings


@worker_app.command("sink")
def worker_sink() -> None:
    """Stream -> Postgres: write every message of synced JSON streams to session_events."""
    import asyncio

    from workers.sink import run_sink

    from . import logs

    logs.setup(os.environ.get("DSGW_LOG_LEVEL", "INFO"))
    asyncio.run(run_sink(_worker_settings()))


@worker_app.command("source")
def worker_source() -> None:
    """Postgres -> stream: append changes of published tables as STATE-PROTOCOL messages."""
    import asyncio

    from workers.source import run_source

    from . import logs

    logs.setup(os.environ.get("DSGW_LOG_LEVEL", "INFO"))
    asyncio.run(run_source(_worker_settings()))


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        raise typer.BadParameter("DATABASE_URL is not set")
    return url


@app.command()
def migrate() -> None:
    """Apply the schema migrations in workers/sql/ to DATABASE_URL."""
    import asyncio

    from workers.migrate import migrate_url

    applied = asyncio.run(migrate_url(_database_url()))
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.command()
def publish(
    table: str = typer.Argument(..., help="Table to publish, e.g. todos or app.todos."),
    stream: str = typer.Option(..., "--stream", help="Stream that receives the changes."),
) -> None:
    """Publish every committed change of TABLE to STREAM (idempotent)."""
    import asyncio

    async def run() -> list[str]:
        import asyncpg

        from workers.migrate import migrate
        from workers.source import publish as install

        conn = await asyncpg.connect(_database_url())
        try:
            await migrate(conn)
            return await install(conn, table, stream)
        finally:
            await conn.close()

    try:
        key_columns = asyncio.run(run())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if os.environ.get("REDIS_URL"):
        asyncio.run(_create_json_stream(stream))
    typer.echo(f"publishing {table} (key: {', '.join(key_columns)}) to {stream}")


async def _create_json_stream(name: str) -> None:
    from .redis_client import connect
    from .settings import Settings
    from .store import Store

    target = await connect(os.environ["REDIS_URL"], max_connections=4)
    try:
        store = Store(
            target.client, publish_command=target.publish_command, sink_filter=Settings.from_env().sink_filter
        )
        await store.create_json_stream(name)
    finally:
        await target.client.aclose()


@app.command()
def unpublish(table: str = typer.Argument(..., help="Table to stop publishing.")) -> None:
    """Stop publishing TABLE (the stream and its messages stay)."""
    import asyncio

    async def run() -> None:
        import asyncpg

        from workers.source import unpublish as remove

        conn = await asyncpg.connect(_database_url())
        try:
            await remove(conn, table)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"stopped publishing {table}")


# --- inspection -------------------------------------------------------------------


async def _redis():  # type: ignore[no-untyped-def]
    from .redis_client import connect

    url = os.environ.get("REDIS_URL", "")
    if not url:
        raise typer.BadParameter("REDIS_URL is not set")
    return (await connect(url, max_connections=8, name=f"dsgw-cli-{os.getpid()}")).client


def _print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


@app.command()
def streams(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the streams: name, content type, messages, bytes, closed, TTL."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from .inspect import list_streams

    async def run() -> list[dict]:
        redis = await _redis()
        try:
            return await list_streams(redis)
        finally:
            await redis.aclose()

    rows = asyncio.run(run())
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "content type", "messages", "bytes", "closed", "ttl / expires")
    for r in rows:
        state = "yes" if r["closed"] else ("deleted" if r["deleted"] else "")
        expiry = f"{r['ttl']} s" if r["ttl"] is not None else (r["expires_at"] or "")
        table.add_row(r["name"], r["content_type"], str(r["messages"]), str(r["bytes"]), state, expiry)
    Console().print(table)


@app.command()
def info(
    name: str = typer.Argument(..., help="Stream name, e.g. chat/room-1."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A stream's state: metadata, producers (epoch, seq), forks, sink lag, Redis keys."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from .inspect import stream_info

    async def run() -> dict | None:
        redis = await _redis()
        try:
            return await stream_info(redis, name)
        finally:
            await redis.aclose()

    data = asyncio.run(run())
    if data is None:
        typer.echo(f"no stream named {name}", err=True)
        raise typer.Exit(1)
    if as_json:
        _print_json(data)
        return
    console = Console()
    overview = Table("field", "value", title=f"stream {name}")
    for field in ("content_type", "tail_offset", "messages", "bytes", "closed", "deleted", "ttl", "expires_at",
                  "forked_from", "fork_offset", "stream_seq", "synced_to_postgres"):  # fmt: skip
        overview.add_row(field, "" if data[field] is None else str(data[field]))
    overview.add_row("forks", ", ".join(data["forks"]))
    if data["sink"]:
        overview.add_row("sink backlog (shard)", str(data["sink"].get("backlog")))
        overview.add_row("sink oldest age ms", str(data["sink"].get("oldest_age_ms")))
    for label, key in data["keys"].items():
        overview.add_row(f"key: {label}", key)
    console.print(overview)
    producers = Table("producer", "epoch", "seq", "updated", title="producers")
    for p in data["producers"]:
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p["updated_ms"] / 1000))
        producers.add_row(p["id"], str(p["epoch"]), str(p["seq"]), updated)
    console.print(producers)


@app.command()
def tail(
    name: str = typer.Argument(..., help="Stream name."),
    from_offset: str = typer.Option("-1", "--from", help="Start after this offset (-1: the beginning)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep waiting for new messages."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per message: offset and message."),
) -> None:
    """Print a stream's messages (JSON as text, text as is, binary as base64)."""
    import asyncio
    import json

    from .inspect import tail as read_tail
    from .offsets import ZERO_ID, BadOffset, parse_offset
    from .protocol import ProblemError

    try:
        after = ZERO_ID if from_offset == "-1" else parse_offset(from_offset)
    except BadOffset:
        raise typer.BadParameter(f"not an offset: {from_offset}") from None

    async def run() -> None:
        redis = await _redis()
        try:
            async for offset, text in read_tail(redis, name, after, follow):
                if as_json:
                    typer.echo(json.dumps({"offset": offset, "message": text}))
                else:
                    typer.echo(f"{offset}  {text}")
        except ProblemError as exc:
            typer.echo(f"{name}: {exc.title}", err=True)
            raise typer.Exit(1) from None
        finally:
            await redis.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
