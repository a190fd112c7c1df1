"""The storage layer: Store, typed wrappers around the Lua scripts (create,
append, close, delete, read). Its fork operations and fork reads are in
gateway/forks.py, the types it hands out in gateway/store_model.py. Knows the
protocol's refusals (ProblemError), not HTTP."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from .forks import ForkOps
from .keys import stream_keys
from .offsets import EntryId, entry_id_str, parse_entry_id
from .protocol import JSON_MEDIA_TYPE, ProblemError, is_json
from .redis_mux import Mux
from .scripts import Scripts
from .store_model import (
    CreateOutcome,
    Entry,
    ForkRequest,
    Messages,
    ReadResult,
    StreamMeta,
    WriteOutcome,
    as_text,
    parse_meta,
)
from .tiering.cold import ColdRange, read_cold
from .tiering.history import History


def _groups_args(groups: list[Messages]) -> list[Any]:
    args: list[Any] = [len(groups)]
    for group in groups:
        args.append(len(group))
        args.extend(group)
    return args


class Store(ForkOps):
    """All stream operations of one gateway process."""

    def __init__(
        self,
        mux: Mux,
        publish_command: str = "PUBLISH",
        sink_filter: Callable[[str], bool] = lambda name: True,
        max_producers: int = 10_000,
        producer_idle_s: int = 7 * 86400,
        tiered: bool = False,
    ) -> None:
        self.mux = mux
        # Retention on (DSGW_RETAIN_*): every new stream goes to the sync feed and
        # Postgres stream_history, so that Redis may trim it (issue 11).
        self.tiered = tiered
        # Producer state per stream is bounded (see save_producer in common.lua).
        self._producer_limits = (max_producers, producer_idle_s * 1000)
        self.scripts = Scripts(mux)
        self.publish_command = publish_command
        # Which JSON streams the Postgres sink receives, decided once at creation.
        self.sink_filter = sink_filter
        # Where reads below a stream's trim point go (gateway/tiering/); None: 410.
        self.history: History | None = None
        # Pattern subscriptions a new stream is linked to at creation, '\n'-joined
        # (gateway/subscriptions/patterns.py); None while subscriptions are off.
        self.subscription_links: Callable[[str], Awaitable[str]] | None = None

    # --- writes ---------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        content_type: str,
        media_type: str,
        ttl: int | None,
        expires_at: tuple[str, int] | None,
        closed: bool,
        body: Messages | None,
        fork: ForkRequest | None = None,
    ) -> CreateOutcome:
        keys = stream_keys(name)
        async with self._fork_in_making(keys, fork):
            groups: list[Messages] = []
            fork_args = ["", "", "", ""]
            if fork is not None:
                source_meta, fork_id = await self._acquire_fork(name, keys, fork, media_type)
                try:
                    content_type = content_type or source_meta.content_type
                    media_type = source_meta.media_type
                    if ttl is None and expires_at is None:
                        # A fork without its own expiry inherits the source's.
                        ttl = source_meta.ttl
                        if ttl is None and source_meta.expires_at and source_meta.expires_ms:
                            expires_at = (source_meta.expires_at, source_meta.expires_ms)
                    if fork.sub_offset:
                        groups.append(await self._sub_offset_prefix(fork.source, fork_id, fork.sub_offset))
                except BaseException:
                    await self._release_unowned(name, fork.source)
                    raise
                fork_args = [
                    fork.source,
                    entry_id_str(fork_id),
                    "1" if fork.offset is not None else "",
                    str(fork.sub_offset) if fork.sub_offset else "",
                ]
            if body:
                groups.append(body)
            args = [
                content_type,
                media_type,
                "1" if is_json(media_type) else "",
                "" if ttl is None else str(ttl),
                expires_at[0] if expires_at else "",
                str(expires_at[1]) if expires_at else "",
                "1" if closed else "",
                *fork_args,
                secrets.token_hex(6),
                "",
                name,
                "1" if is_json(media_type) and self.sink_filter(name) else "",
                "1" if self.tiered else "",
                await self.subscription_links(name) if self.subscription_links else "",
                *_groups_args(groups),
            ]
            reply = await self.scripts.call("create", keys.all, args)
            status = as_text(reply[0])
            if status == "created":
                replaced_source = as_text(reply[3])
                # An expired stream this one replaced held a reference on its source;
                # a fork re-created on the same source keeps using that reference.
                if replaced_source and (fork is None or replaced_source != fork.source):
                    await self.release_fork(replaced_source, name)
                return CreateOutcome(True, parse_entry_id(reply[1]), reply[2] == b"1", content_type)
            if fork is not None and status != "exists":
                await self._release_unowned(name, fork.source)
            if status == "exists":
                return CreateOutcome(False, parse_entry_id(reply[1]), reply[2] == b"1", as_text(reply[3]))
            if status == "gone":
                raise ProblemError(409, "Stream was deleted", "forks still read through this path")
            raise ProblemError(409, "Stream exists with a different configuration")

    async def create_json_stream(self, name: str) -> None:
        """Create `name` as a plain application/json stream unless a stream of
        that name exists (whatever its configuration)."""
        with contextlib.suppress(ProblemError):  # 409: it exists
            await self.create(
                name, content_type=JSON_MEDIA_TYPE, media_type=JSON_MEDIA_TYPE,
                ttl=None, expires_at=None, closed=False, body=None,
            )  # fmt: skip

    async def append(
        self,
        name: str,
        media_type: str,
        messages: Messages,
        *,
        close: bool = False,
        stream_seq: str | None = None,
        producer: tuple[str, int, int] | None = None,
        source_seq: str | None = None,
    ) -> WriteOutcome:
        """Append one group of messages. `source_seq` is the Postgres source
        worker's own exactly-once sequence (fixed width, compared byte-wise;
        status 'source_dup' with the stored one in `detail` when not above it)."""
        keys = stream_keys(name)
        pid, epoch, seq = producer or ("", 0, 0)
        args = [
            media_type,
            "1" if close else "",
            stream_seq or "",
            pid,
            epoch,
            seq,
            self.publish_command,
            keys.channel,
            source_seq or "",
            *self._producer_limits,
            1,
            len(messages),
            *messages,
        ]
        reply = await self.scripts.call("append", keys.all, args)
        return await self._outcome(name, reply)

    async def close(self, name: str, producer: tuple[str, int, int] | None) -> WriteOutcome:
        keys = stream_keys(name)
        pid, epoch, seq = producer or ("", 0, 0)
        args = [pid, epoch, seq, self.publish_command, keys.channel, *self._producer_limits]
        reply = await self.scripts.call("close", keys.all, args)
        return await self._outcome(name, reply)

    async def _outcome(self, name: str, reply: list[Any]) -> WriteOutcome:
        status = as_text(reply[0])
        if status == "ok":
            return WriteOutcome(status, parse_entry_id(reply[1]), len(reply) > 2 and reply[2] == b"1")
        if status == "dup":
            return WriteOutcome(status, parse_entry_id(reply[1]), False, int(reply[2]))
        if status == "closed_dup":
            return WriteOutcome(status, parse_entry_id(reply[1]), True, int(reply[2]))
        if status == "closed":
            return WriteOutcome(status, parse_entry_id(reply[1]), True)
        if status == "source_dup":
            return WriteOutcome(status, detail=as_text(reply[1]))
        await self._raise_missing(name, status, reply)
        return WriteOutcome(status, detail=as_text(reply[1]) if len(reply) > 1 else "")

    async def _raise_missing(self, name: str, status: str, reply: list[Any]) -> None:
        if status == "expired" and len(reply) > 1 and reply[1]:
            await self.release_fork(as_text(reply[1]), name)
        if status in ("absent", "expired"):
            raise ProblemError(404, "Stream not found")
        if status == "gone":
            raise ProblemError(410, "Stream was deleted")

    async def delete(self, name: str) -> None:
        keys = stream_keys(name)
        reply = await self.scripts.call("delete", keys.all, [self.publish_command, keys.channel])
        status = as_text(reply[0])
        if status == "deleted":
            if reply[1]:
                await self.release_fork(as_text(reply[1]), name)
            return
        if status == "soft":
            await self._release_vanished_forks(name)
            return
        await self._raise_missing(name, status, reply)

    # --- reads ------------------------------------------------------------------

    async def read(
        self,
        name: str,
        after: EntryId | None,
        *,
        touch: bool,
        max_bytes: int,
        max_entries: int,
    ) -> ReadResult:
        """The stream's metadata and, unless `after` is None, its data after that
        offset: whole appends only, stopping after the append that crosses
        `max_bytes` (or `max_entries` entries). 404/410 for missing or deleted
        streams."""
        keys = stream_keys(name)
        args = ["" if after is None else entry_id_str(after), max_bytes, "1" if touch else "", max_entries]
        reply = await self.scripts.call("read", keys.all, args, changes_nothing=True)
        status = as_text(reply[0])
        if status == "live":
            meta = parse_meta(reply[1])
            if not reply[4]:
                # Nothing new (or past the tail): the next offset is the tail itself.
                return ReadResult(meta, b"", 0, meta.tail)
            return ReadResult(meta, reply[2], reply[4], parse_entry_id(reply[3]))
        if status == "fork":
            assert after is not None
            return await self._read_fork(name, parse_meta(reply[1]), after, max_bytes, max_entries)
        if status == "cold":
            assert after is not None
            meta = parse_meta(reply[3])
            trim, base = parse_entry_id(reply[1]), parse_entry_id(reply[2])
            span = ColdRange(name, after, trim, trim, base)
            rows = await read_cold(self.history, span, max_bytes, max_entries, json=meta.json)
            assert rows.last is not None
            # Stops at trim at the latest: the next read continues in Redis.
            return ReadResult(meta, rows.body, rows.count, rows.last)
        await self._raise_missing(name, status, reply)
        raise AssertionError(status)  # _raise_missing raised

    async def read_entries(self, name: str, after: EntryId, limit: int) -> tuple[StreamMeta, list[Entry]]:
        """Up to `limit` messages after `after`, each with its entry ID: for
        tools that print offsets per message (`dsgw tail`), not the hot path."""
        result = await self.read(name, None, touch=False, max_bytes=0, max_entries=0)
        return result.meta, await self._read_view(name, result.meta, after, None, limit)
