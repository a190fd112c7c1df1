"""`dsgw migrate`, `publish` and `unpublish`: the Postgres side of the sync
(workers/migrate.py, workers/source.py)."""

from __future__ import annotations

import os

import typer

from .cli_support import CliError, connect_postgres, connect_redis, dev_urls, run_async

# Merged into `dsgw` by gateway/cli.py (a Typer added without a name lends it its commands).
commands = typer.Typer()


@commands.command()
def migrate() -> None:
    """Apply the schema migrations in workers/sql/ to DATABASE_URL."""
    from workers.migrate import migrate as apply

    async def run() -> list[str]:
        conn = await connect_postgres()
        try:
            return await apply(conn)
        finally:
            await conn.close()

    applied = run_async(run())
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@commands.command()
def publish(
    table: str = typer.Argument(..., help="Table to publish, e.g. todos or app.todos."),
    stream: str = typer.Option(..., "--stream", help="Stream that receives the changes."),
) -> None:
    """Publish every committed change of TABLE to STREAM (idempotent)."""
    from workers.migrate import migrate as apply
    from workers.source import publish as install

    async def run() -> list[str]:
        conn = await connect_postgres()
        try:
            await apply(conn)
            return await install(conn, table, stream)
        finally:
            await conn.close()

    try:
        key_columns = run_async(run())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # The source worker creates the stream too; creating it now lets readers attach at once.
    if os.environ.get("REDIS_URL") or dev_urls()[0]:
        run_async(_create_json_stream(stream))
    typer.echo(f"publishing {table} (key: {', '.join(key_columns)}) to {stream}")


async def _create_json_stream(name: str) -> None:
    from .settings import Settings
    from .stores import configured_store

    target = await connect_redis()
    try:
        store = configured_store(target.mux, target.publish_command, Settings.from_env())
        await store.create_json_stream(name)
    finally:
        await target.close()


@commands.command()
def unpublish(table: str = typer.Argument(..., help="Table to stop publishing.")) -> None:
    """Stop publishing TABLE (the stream and its messages stay)."""
    from workers.source import unpublish as remove

    async def run() -> None:
        conn = await connect_postgres()
        try:
            await remove(conn, table)
        finally:
            await conn.close()

    try:
        run_async(run())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    typer.echo(f"stopped publishing {table}")
