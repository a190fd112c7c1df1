"""Subscription state in Redis: the sub_*.lua transitions (one script per
transition, each on one subscription's slot) and the reads around them.

Keys: gateway/keys.py (subscription_keys, SUBSCRIPTIONS, SUB_TIMERS, ...).
Every transition that can leave work for later (a lease, a delivery to take
over, a retry) is followed by `arm(id, due)`: ZADD LT on the timers ZSET, so
an entry only ever moves earlier, except when the timer loop (dispatch.py)
claims a due entry by re-scoring it TIMER_VISIBILITY_MS ahead. After its tick
the loop arms it again (LT) or drops it only if nobody re-armed it meanwhile
(sub_timers_done.lua), so no transition's timer is pushed back or lost. A
replica dying between a transition and its `arm` leaves the work to the
recovery sweep."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from redis.exceptions import NoScriptError

from .. import keys
from ..offsets import ZERO_OFFSET, entry_id_to_offset
from ..scripts import script_sha, script_source

# After issuing a wake, the issuing replica delivers it at once; another
# replica takes the delivery over after this long (a webhook delivery takes at
# most DSGW_WEBHOOK_TIMEOUT_MS, 10 s by default).
TAKEOVER_MS = 15_000
# A timer entry claimed by a replica falls due again after this long.
TIMER_VISIBILITY_MS = 15_000
# A subscription's GET (and `dsgw subscriptions`) lists at most this many of its
# links: a pattern may link millions, and the answer is built in memory.
LISTED_LINKS_MAX = 1000


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def new_wake_id() -> str:
    return "w_" + secrets.token_hex(8)


def now_ms() -> int:
    return int(time.time() * 1000)


class SubState:
    """Redis access for subscriptions, over the gateway's mux (standalone or cluster)."""

    def __init__(self, mux: Any) -> None:
        self.mux = mux

    async def script(self, name: str, key_list: list[str], args: list[Any]) -> Any:
        command = ("EVALSHA", script_sha(name), len(key_list), *key_list, *args)
        try:
            return await self.mux.run(command, key_list[0], False)
        except NoScriptError:
            await self.mux.execute("SCRIPT", "LOAD", script_source(name), key=key_list[0])
            return await self.mux.run(command, key_list[0], False)

    async def sub(self, name: str, sub_id: str, args: list[Any]) -> list[Any]:
        reply = await self.script(name, keys.subscription_keys(sub_id).all, args)
        return [text(x) for x in reply] if isinstance(reply, list) else [text(reply)]

    async def execute(self, *command: Any, key: str) -> Any:
        return await self.mux.execute(*command, key=key)

    # --- timers -----------------------------------------------------------------

    async def arm(self, sub_id: str, due: str | int) -> None:
        if due == "" or due is None:
            return
        await self.execute("ZADD", keys.SUB_TIMERS, "LT", int(due), sub_id, key=keys.SUB_TIMERS)

    async def take_timers(self, limit: int) -> tuple[list[str], int]:
        """Due subscription ids, and the score they were re-scored to (the claim)."""
        now = now_ms()
        reply = await self.script("sub_timers_take", [keys.SUB_TIMERS], [now, TIMER_VISIBILITY_MS, limit])
        return [text(x) for x in reply], now + TIMER_VISIBILITY_MS

    async def disarm(self, sub_id: str, claimed: int) -> None:
        """Drop the timer entry unless a transition re-armed it since it was claimed."""
        await self.script("sub_timers_done", [keys.SUB_TIMERS], [sub_id, claimed])

    # --- reads --------------------------------------------------------------------

    async def hash(self, key: str) -> dict[str, str]:
        flat = await self.execute("HGETALL", key, key=key)
        return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def load(self, sub_id: str, links_cursor: int = 0) -> dict[str, Any] | None:
        """Definition, state, `links_total`, and the links, cursors and tails
        of the linked streams: all of them up to LISTED_LINKS_MAX links
        (`links_cursor` None); past that, one page of about that many from
        HSCAN cursor `links_cursor` (`links_cursor` then the next page's, ""
        at the end). None when there is no such subscription."""
        head = await self.load_head(sub_id)
        if head is None:
            return None
        k = keys.subscription_keys(sub_id)
        total = int(await self.execute("HLEN", k.links, key=k.links))
        if total <= LISTED_LINKS_MAX and not links_cursor:
            links, acked, tails = await asyncio.gather(
                self.hash(k.links), self.hash(k.acked), self.hash(k.tails)
            )
            everything = {"links": links, "acked": acked, "tails": tails}
            return {**head, **everything, "links_total": total, "links_cursor": None}
        paths: set[str] = set()
        cursor: Any = links_cursor
        while len(paths) < LISTED_LINKS_MAX:
            cursor, flat = await self.execute(
                "HSCAN", k.links, cursor, "COUNT", LISTED_LINKS_MAX, key=k.links
            )
            paths.update(text(flat[i]) for i in range(0, len(flat), 2))
            if int(cursor) == 0:
                break
        page = await self.streams_of(sub_id, sorted(paths))
        next_cursor = "" if int(cursor) == 0 else text(cursor)
        return {**head, **page, "links_total": total, "links_cursor": next_cursor}

    async def load_wake(self, sub_id: str) -> dict[str, Any] | None:
        """What delivering the current wake needs: definition, state, and the
        links, cursors and tails of only the streams the wake names (its
        snapshot, at most WAKE_STREAMS_MAX of sub_common.lua), or None."""
        head = await self.load_head(sub_id)
        if head is None:
            return None
        paths = sorted(json.loads(head["state"].get("snap") or "{}"))
        return {**head, **await self.streams_of(sub_id, paths)}

    async def load_head(self, sub_id: str) -> dict[str, Any] | None:
        """Definition and state only (no per-stream data), or None."""
        k = keys.subscription_keys(sub_id)
        definition, state = await asyncio.gather(self.hash(k.definition), self.hash(k.state))
        return {"def": definition, "state": state} if definition else None

    async def streams_of(self, sub_id: str, paths: list[str]) -> dict[str, dict[str, str]]:
        """links, acked and tails of `paths` only (the ones linked)."""
        if not paths:
            return {"links": {}, "acked": {}, "tails": {}}
        k = keys.subscription_keys(sub_id)
        found = await asyncio.gather(
            *(self.execute("HMGET", key, *paths, key=key) for key in (k.links, k.acked, k.tails))
        )
        links, acked, tails = (
            {p: text(v) for p, v in zip(paths, values, strict=True) if v is not None} for values in found
        )
        return {"links": links, "acked": {p: v for p, v in acked.items() if p in links},
                "tails": {p: v for p, v in tails.items() if p in links}}  # fmt: skip

    async def ids(self) -> list[str]:
        return sorted(
            text(x) for x in await self.execute("SMEMBERS", keys.SUBSCRIPTIONS, key=keys.SUBSCRIPTIONS)
        )

    async def stream_tail(self, name: str) -> str | None:
        """The stream's tail as a DS offset, or None when it does not exist."""
        sk = keys.stream_keys(name)
        raw = await self.execute("HGET", sk.meta, "tail", key=sk.meta)
        return None if raw is None else entry_id_to_offset(raw)

    async def stream_tails(self, names: list[str]) -> dict[str, str]:
        """Tails of existing streams (missing ones left out); pipelined by the mux."""
        found = await asyncio.gather(*(self.stream_tail(n) for n in names))
        return {n: t for n, t in zip(names, found, strict=True) if t is not None}

    # --- links between streams and subscriptions --------------------------------

    async def link(self, sub_id: str, kind: str, paths: list[str], start_new_at: str | None = None) -> bool:
        """Link `paths` (kind 'e' or 'g'). The stream's own link set first, so an
        append from now on queues a wake; then the cursor at the tail read after
        that (or `start_new_at`). False if the subscription does not exist."""
        await asyncio.gather(*(self._stream_link(p, sub_id) for p in paths))
        tails = await self.stream_tails(paths)
        args: list[Any] = [kind]
        for p in paths:
            tail = tails.get(p, ZERO_OFFSET)
            args += [p, start_new_at if start_new_at is not None else tail, tail]
        reply = await self.sub("sub_link", sub_id, args)
        return reply[0] == "ok"

    async def _stream_link(self, path: str, sub_id: str) -> None:
        sk = keys.stream_keys(path)
        await self.execute("SADD", sk.subs, sub_id, key=sk.subs)

    async def stream_unlink(self, path: str, sub_id: str) -> None:
        sk = keys.stream_keys(path)
        await self.execute("SREM", sk.subs, sub_id, key=sk.subs)
