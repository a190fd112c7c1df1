"""What every `dsgw` command shares: where Redis and Postgres are (REDIS_URL /
DATABASE_URL, or the running `dsgw dev`'s dev.json), connecting to them, turning
their failures into one-line CliErrors, and printing tables and JSON."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import typer

T = TypeVar("T")


class CliError(Exception):
    """An expected failure: one line on stderr, exit code 1."""


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


async def connect_redis():  # type: ignore[no-untyped-def]
    """A connection to Redis (a RedisTarget: client and mux)."""
    from .redis_client import connect

    return await connect(redis_url(), max_connections=8, name=f"dsgw-cli-{os.getpid()}")


def with_redis(use: Callable[[Any], Awaitable[T]]) -> T:
    """`use(target)` on a fresh Redis connection, closed afterwards; failures as for run_async."""

    async def run() -> T:
        target = await connect_redis()
        try:
            return await use(target)
        finally:
            await target.close()

    return run_async(run())


async def connect_postgres():  # type: ignore[no-untyped-def]
    import asyncpg

    return await asyncpg.connect(database_url(), timeout=10)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
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


def print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


def print_rows(headers: list[str], rows: list[list[str]], title: str = "") -> None:
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
