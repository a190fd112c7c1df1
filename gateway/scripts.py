"""Loads the Lua scripts in gateway/lua/ (resolving `-- @include name` lines
from lua/includes/) and calls them by SHA."""

from __future__ import annotations

import hashlib
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from .metrics import BATCHED, REDIS_CALL_SECONDS
from .offsets import EntryId, entry_id_str

if TYPE_CHECKING:
    from .redis_mux import Mux

LUA_DIR = Path(__file__).with_name("lua")
SCRIPT_NAMES = (
    "create", "append", "close", "delete", "read", "read_range", "fork_acquire", "fork_release",
)  # fmt: skip


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
    """The gateway's Lua scripts, called by SHA. A script that changes
    something is sent once: NOSCRIPT (it did not run) is the only answer that
    leads to sending it again."""

    def __init__(self, mux: Mux) -> None:
        self._mux = mux
        self._latency = {name: REDIS_CALL_SECONDS.labels(name) for name in SCRIPT_NAMES}
        self._shas = {name: script_sha(name) for name in SCRIPT_NAMES}

    async def call(
        self, name: str, keys: list[str], args: list[Any], *, changes_nothing: bool = False
    ) -> Any:
        """Run script `name`. `changes_nothing`: it may be retried once on a
        fresh connection if the connection died under it."""
        started = time.perf_counter()
        command = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        try:
            try:
                return await self._mux.run(command, keys[0], changes_nothing)
            except NoScriptError:
                # A new or restarted Redis (or cluster node): load, then send once more.
                await self._mux.execute("SCRIPT", "LOAD", script_source(name), key=keys[0])
                return await self._mux.run(command, keys[0], changes_nothing)
        finally:
            BATCHED.observe(self._latency[name], time.perf_counter() - started)

    async def call_range(
        self,
        keys: tuple[str, str],
        after: EntryId,
        upper: EntryId | None,
        max_bytes: int,
        max_entries: int,
        json: bool,
    ) -> list[Any]:
        """read_range.lua on (data key, meta key) of one stream: ['hot', body,
        last entry ID, count] of the slice, or ['cold', trim, base] when the
        slice starts below the stream's trim point."""
        args = [entry_id_str(after), entry_id_str(upper) if upper else "+", max_bytes, max_entries,
                "1" if json else ""]  # fmt: skip
        reply: list[Any] = await self.call("read_range", list(keys), args, changes_nothing=True)
        return reply
