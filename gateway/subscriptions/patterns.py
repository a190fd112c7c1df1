"""Subscription globs over stream paths, and which pattern subscriptions a new
stream is linked to at creation (before its first append).

Globs (PROTOCOL.md 6.2): `*` matches exactly one path segment, `**` zero or
more segments; every other segment matches itself."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from .. import keys


def normalize_path(path: str) -> str:
    """Stream-root-relative: no leading or trailing slashes."""
    return path.strip("/")


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for segment in normalize_path(pattern).split("/"):
        if segment == "**":
            parts.append("(?:[^/]+(?:/[^/]+)*)?")
        else:
            parts.append("[^/]+" if segment == "*" else re.escape(segment))
    # "a/**/b" must also match "a/b": the segment separators around ** are optional.
    regex = "/".join(parts).replace("/(?:[^/]+(?:/[^/]+)*)?", "(?:/[^/]+)*")
    regex = regex.replace("(?:[^/]+(?:/[^/]+)*)?/", "(?:[^/]+/)*")
    return re.compile(regex)


def glob_match(pattern: str, path: str) -> bool:
    return _compile(pattern).fullmatch(normalize_path(path)) is not None


class PatternCache:
    """The pattern subscriptions, as every replica must see them when it
    creates a stream. One GET of a version counter per stream creation; the
    patterns themselves are read again only when it changed."""

    def __init__(self, mux: Any) -> None:
        self.mux = mux
        self._version: bytes | None = None
        self._patterns: dict[str, tuple[str, str]] = {}

    async def refresh(self) -> dict[str, tuple[str, str]]:
        version = await self.mux.execute("GET", keys.SUB_PATTERNS_VERSION, key=keys.SUB_PATTERNS_VERSION)
        if version != self._version or version is None:
            flat = await self.mux.execute("HGETALL", keys.SUB_PATTERNS, key=keys.SUB_PATTERNS)
            patterns = {}
            for i in range(0, len(flat), 2):
                doc = json.loads(flat[i + 1])
                patterns[flat[i].decode()] = (doc["pattern"], doc.get("wake_stream") or "")
            self._patterns, self._version = patterns, version
        return self._patterns

    async def links_for(self, name: str) -> str:
        """Ids of the pattern subscriptions `name` matches, '\\n'-joined (create.lua ARGV)."""
        patterns = await self.refresh()
        if not patterns or name.startswith("__ds/"):
            return ""
        return "\n".join(
            sub_id
            for sub_id, (pattern, wake_stream) in patterns.items()
            if name != wake_stream and glob_match(pattern, name)
        )


async def register(mux: Any, sub_id: str, pattern: str, wake_stream: str) -> None:
    doc = json.dumps({"pattern": pattern, "wake_stream": wake_stream})
    await mux.execute("HSET", keys.SUB_PATTERNS, sub_id, doc, key=keys.SUB_PATTERNS)
    await mux.execute("INCR", keys.SUB_PATTERNS_VERSION, key=keys.SUB_PATTERNS_VERSION)


async def unregister(mux: Any, sub_id: str) -> None:
    await mux.execute("HDEL", keys.SUB_PATTERNS, sub_id, key=keys.SUB_PATTERNS)
    await mux.execute("INCR", keys.SUB_PATTERNS_VERSION, key=keys.SUB_PATTERNS_VERSION)
