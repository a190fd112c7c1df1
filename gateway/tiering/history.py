"""The cold tier as a reader sees it: rows of Postgres table stream_history
(workers/sql/005_stream_history.sql, one row per Redis entry, payload bytes
as stored) turned into the same response body a Redis read builds
(gateway/lua/includes/collect.lua), under the same rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from ..offsets import EntryId, format_offset, parse_offset

# One range scan of the primary key (stream_name, ds_offset): offsets are
# fixed-width, so string order is numeric order. `before` counts the payload
# bytes of the rows ahead of each row, so rows beyond the byte budget never
# leave Postgres (octet_length of a TOASTed value reads no payload). The first
# row always comes, however large: a reader must always make progress.
_ROWS = """
SELECT ds_offset, more, data FROM (
    SELECT ds_offset, more, data,
           sum(octet_length(data)) OVER (ORDER BY ds_offset) - octet_length(data) AS before
      FROM stream_history
     WHERE stream_name = $1 AND ds_offset > $2 AND ds_offset <= $3
     ORDER BY ds_offset
     LIMIT $4
) AS r
WHERE before < greatest($5::bigint, 1)
ORDER BY ds_offset
"""
# Rows in order: the rest of an append the budget stopped in (`more` says how
# many rows follow), or a tool's page of messages.
_REST = """
SELECT ds_offset, more, data FROM stream_history
 WHERE stream_name = $1 AND ds_offset > $2 AND ds_offset <= $3
 ORDER BY ds_offset
 LIMIT $4
"""
# Rows one query may scan for the byte-bounded read.
_SCAN_ROWS = 1024


class HistoryUnavailable(Exception):
    """Postgres did not answer (down, unreachable, too slow)."""


@dataclass(slots=True)
class Slice:
    """`count` rows as one body (JSON: texts joined with ',', no brackets;
    else concatenated); `last` is the last row's entry ID (None: no rows)."""

    body: bytes
    last: EntryId | None
    count: int


class History:
    """A small asyncpg pool on the history database, opened lazily: a gateway
    starts (and serves hot reads) whether or not Postgres is up."""

    def __init__(self, url: str, *, timeout_s: float, max_connections: int) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    # min_size=0: no connection until the first cold read.
                    self._pool = await asyncpg.create_pool(
                        self.url,
                        min_size=0,
                        max_size=self.max_connections,
                        timeout=self.timeout_s,
                        command_timeout=self.timeout_s,
                    )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def read_rows(
        self,
        stream: str,
        after: EntryId,
        upper: EntryId,
        base: EntryId,
        max_bytes: int,
        max_entries: int,
        *,
        json: bool,
    ) -> Slice:
        """The rows of `stream` after `after` up to `upper` (inclusive), never
        at or below `base` (rows of an earlier stream of the same name), whole
        appends only: stops after the append that brings the body to
        `max_bytes` or `max_entries` rows; the row at `upper` ends an append."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.timeout_s) as conn:
                return await _collect(conn, stream, max(after, base), upper, max_bytes, max_entries, json)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HistoryUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def read_entries(
        self, stream: str, after: EntryId, upper: EntryId, base: EntryId, limit: int
    ) -> list[tuple[EntryId, bytes, int]]:
        """Up to `limit` rows of `stream` in (after, upper] above `base`, each as
        (entry ID, payload, more): for tools that print offsets per message."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.timeout_s) as conn:
                lower = format_offset(max(after, base))
                rows = await conn.fetch(_REST, stream, lower, format_offset(upper), limit)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HistoryUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return [(parse_offset(offset), data, more) for offset, more, data in rows]


async def _collect(
    conn: asyncpg.Connection,
    stream: str,
    lower: EntryId,
    upper: EntryId,
    max_bytes: int,
    max_entries: int,
    json: bool,
) -> Slice:
    upper_text = format_offset(upper)
    parts: list[bytes] = []
    size = 0
    last = format_offset(lower)
    more = 0
    while True:
        wanted = max(1, min(_SCAN_ROWS, max_entries - len(parts)))
        rows = await conn.fetch(_ROWS, stream, last, upper_text, wanted, max_bytes - size)
        for offset, row_more, data in rows:
            parts.append(data)
            size += len(data)
            last = offset
            more = 0 if offset == upper_text else row_more
            if size >= max_bytes or len(parts) >= max_entries:
                break
        full = size >= max_bytes or len(parts) >= max_entries
        if full or len(rows) < wanted:
            break
    if full and more:
        # The budget ran out inside an append: its remaining rows come too.
        for offset, _, data in await conn.fetch(_REST, stream, last, upper_text, more):
            parts.append(data)
            last = offset
    if not parts:
        return Slice(b"", None, 0)
    return Slice((b"," if json else b"").join(parts), parse_offset(last), len(parts))
