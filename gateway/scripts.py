"""Loads the Lua scripts in gateway/lua/ (resolving `-- @include name` lines
from lua/includes/) and calls them by SHA."""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

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


class Scripts:
    """The gateway's Lua scripts, registered on one Redis client."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES
        }

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await self._scripts[name](keys=keys, args=args)
        finally:
            REDIS_CALL_SECONDS.labels(name).observe(time.perf_counter() - started)
