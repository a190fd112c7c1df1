"""`dsgw check-config`: the effective settings of the gateway and the workers,
and what is wrong with them: unreadable values, unknown (misspelt) variables,
Redis and Postgres unreachable or configured against our guarantees."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Every variable the code reads, found in its own source so the list never
# goes stale: a set DSGW_* variable that is not among them is a typo.
_PACKAGES = [Path(__file__).parent, Path(__file__).parent.parent / "workers"]
_NAME = re.compile(r"[\"'](DSGW_[A-Z0-9_]+)[\"']")


def known_variables() -> set[str]:
    names = {"REDIS_URL", "DATABASE_URL"}
    for package in _PACKAGES:
        for path in package.glob("*.py"):
            names.update(_NAME.findall(path.read_text()))
    return names


@contextmanager
def _without(name: str) -> Iterator[None]:
    value = os.environ.pop(name)
    try:
        yield
    finally:
        os.environ[name] = value


def _load(loader: Callable[[], Any], label: str, problems: list[dict[str, str]]) -> dict[str, Any]:
    """`loader()`'s settings as a dict; on a bad value, a problem naming the variable."""
    try:
        return asdict(loader())
    except ValueError as exc:
        culprits = []
        for name in sorted(n for n in os.environ if n.startswith("DSGW_")):
            with _without(name):
                try:
                    loader()
                except ValueError:
                    continue
            culprits.append(name)
        if not culprits:
            problems.append(_error(f"{label} settings: {exc}"))
        for name in culprits:
            problems.append(_error(f"{name}={os.environ[name]!r} is not a valid value ({exc})"))
        return {}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _error(message: str) -> dict[str, str]:
    return {"level": "error", "message": message}


def _warning(message: str) -> dict[str, str]:
    return {"level": "warning", "message": message}


async def check(mask: Callable[[str], str]) -> dict[str, Any]:
    """{"settings": {"gateway", "workers", "dev"}, "problems": [{"level", "message"}]}."""
    from workers.settings import WorkerSettings

    from . import devstate
    from .settings import Settings

    problems: list[dict[str, str]] = []
    known = known_variables()
    for name in sorted(n for n in os.environ if n.startswith("DSGW_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(_warning(f"{name} is set but ds-gateway reads no such variable{hint}"))

    shards = os.environ.get("DSGW_SHARDS", "").strip()
    if shards and (not shards.isdigit() or int(shards) < 1):
        problems.append(_error(f"DSGW_SHARDS={shards!r} is not a positive integer"))
    gateway = _load(Settings.from_env, "gateway", problems)
    if gateway and (not shards or shards.isdigit()):
        gateway["shards"] = int(shards or 1024)  # gateway/keys.py reads it
    worker = _load(WorkerSettings.from_env, "worker", problems)
    data_dir = devstate.data_dir_from_env()
    state = devstate.read(data_dir)
    redis_url = os.environ.get("REDIS_URL", "").strip()
    database_url = os.environ.get("DATABASE_URL", "").strip()
    dev = {"data_dir": str(data_dir), "running": f"pid {state.pid}, {state.base_url}" if state else "no"}
    if not redis_url and state:
        redis_url, dev["redis_url_from"] = state.redis_url, str(data_dir / devstate.STATE_FILE)
    if not database_url and state and state.database_url:
        database_url, dev["database_url_from"] = state.database_url, str(data_dir / devstate.STATE_FILE)
    for settings in (gateway, worker):
        for key in ("redis_url", "database_url"):
            if key in settings:
                settings[key] = mask(redis_url if key == "redis_url" else database_url) or "(not set)"
    if gateway.get("auth_jwt_secret"):
        gateway["auth_jwt_secret"] = "***"  # a secret is never printed
    if gateway.get("history_database_url"):
        gateway["history_database_url"] = mask(gateway["history_database_url"])  # may hold a password

    if redis_url:
        problems += await check_redis(redis_url, mask)
    else:
        problems.append(_error("REDIS_URL is not set (and no `dsgw dev` runs): the gateway cannot start"))
    if database_url:
        problems += await check_postgres(database_url, mask)
    else:
        problems.append(_warning("DATABASE_URL is not set: the sink and source workers cannot start"))
    if gateway and "*" in gateway.get("cors_origins", []):
        problems.append(_warning("DSGW_CORS_ORIGINS is * (any web page may call the gateway)"))
    return {"settings": {"gateway": gateway, "workers": worker, "dev": dev}, "problems": problems}


async def check_redis(url: str, mask: Callable[[str], str]) -> list[dict[str, str]]:
    """Reachable, version 6.2+, and configured for our durability promise."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    problems = []
    try:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        return [_error(f"REDIS_URL {mask(url)} is not a Redis URL: {exc}")]
    try:
        info = await client.info("server")
        version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])
        if version < (6, 2):
            problems.append(
                _error(f"Redis {info['redis_version']} is older than 6.2, which ds-gateway needs")
            )
        config: dict[str, str] = {}
        try:
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):  # one per call on 6.2
                reply: dict[Any, Any] = await client.config_get(name)
                config.update({_text(k): _text(v or "") for k, v in reply.items()})
        except RedisError:
            problems.append(_warning("cannot read Redis's persistence settings (CONFIG GET is not allowed)"))
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            problems.append(
                _error(
                    f"Redis maxmemory-policy is {config['maxmemory-policy']}: Redis may evict stream keys"
                    " (use noeviction)"
                )
            )
        if config.get("appendonly") == "no":
            problems.append(_warning("Redis has appendonly no: a Redis restart loses acknowledged appends"))
        elif config.get("appendfsync") not in (None, "always"):
            problems.append(
                _warning(
                    f"Redis appendfsync is {config['appendfsync']}: a host crash can lose about the last second"
                    " of acknowledged appends (deploy/redis.conf uses always)"
                )
            )
    except (RedisError, OSError) as exc:
        problems.append(_error(f"cannot reach Redis at {mask(url)}: {exc}"))
    finally:
        await client.aclose()
    return problems


async def check_postgres(url: str, mask: Callable[[str], str]) -> list[dict[str, str]]:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
        return [_error(f"cannot reach Postgres at {mask(url)}: {exc}")]
    try:
        migrated = await conn.fetchval("SELECT to_regclass('session_events') IS NOT NULL")
    finally:
        await conn.close()
    if not migrated:
        return [_warning("Postgres has no session_events table yet (run `dsgw migrate`, or start a worker)")]
    return []
