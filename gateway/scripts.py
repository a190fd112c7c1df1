"""Loads the Lua scripts in gateway/lua/ (resolving `-- @include name` lines
from lua/includes/) and calls them by SHA."""

from __future__ import annotations

import hashlib
import time
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .metrics import REDIS_CALL_SECONDS

LUA_DIR = Path(__file__).with_name("lua")
SCRIPT_NAMES = ("create", "append", "close", "delete", "read", "fork_acquire", "fork_release")


@cache
def script_source(name: str) -> str:
    lines = []
    for line in (LUA_DIR / f"{name}.lua").read_text().splitlines():
        if line.startswith("-- @include "):
            include = line.removeprefix("-- @include ").strip()
            lines.append((LUA_DIR / "includes" / f"{include}.lua").read_text())
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


@cache
def script_sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode()).hexdigest()


class Scripts:
    """The gateway's Lua scripts, called by SHA on one Redis client (plain
    EVALSHA: redis-py's Script objects add a layer per call for nothing)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._latency = {name: REDIS_CALL_SECONDS.labels(name) for name in SCRIPT_NAMES}

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        started = time.perf_counter()
        try:
            try:
                return await self._redis.execute_command("EVALSHA", script_sha(name), len(keys), *keys, *args)
            except NoScriptError:
                # A new or restarted Redis (or cluster node): load, then retry once.
                await self._redis.script_load(script_source(name))
                return await self._redis.execute_command("EVALSHA", script_sha(name), len(keys), *keys, *args)
        finally:
            self._latency[name].observe(time.perf_counter() - started)
