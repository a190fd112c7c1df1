"""A subscription's configuration as the client sends it (PUT body),
validated and normalised, and its hash for idempotent re-confirmation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .errors import invalid
from .patterns import normalize_path

DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 600_000
MAX_STREAMS = 1_000
MAX_FIELD_BYTES = 2_048


@dataclass(frozen=True, slots=True)
class SubConfig:
    type: str
    pattern: str | None
    streams: tuple[str, ...]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    def canonical(self) -> dict[str, Any]:
        """What is hashed, and what GET shows of the configuration."""
        return {
            "type": self.type,
            "pattern": self.pattern,
            "streams": list(self.streams),
            "webhook": {"url": self.webhook_url} if self.webhook_url else None,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }

    def hash(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def stream_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip("/"):
        raise invalid(f"{what} must be a non-empty string")
    path = normalize_path(value)
    if len(path.encode()) > MAX_FIELD_BYTES or any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise invalid(f"{what} is too long or has control characters")
    if path == "__ds" or path.startswith("__ds/"):
        raise invalid(f"{what} may not name the reserved __ds paths")
    return path


def stream_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_STREAMS:
        raise invalid(f"streams must be a non-empty array of at most {MAX_STREAMS} paths")
    return [stream_path(item, "each stream") for item in value]


def parse_config(body: Any) -> SubConfig:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    kind = body.get("type")
    if kind not in ("webhook", "pull-wake"):
        raise invalid('type must be "webhook" or "pull-wake"')
    pattern = body.get("pattern")
    if pattern is not None and pattern != "":
        pattern = stream_path(pattern, "pattern")
    else:
        pattern = None
    raw_streams = body.get("streams")
    streams = stream_list(raw_streams) if raw_streams not in (None, []) else []
    if pattern is None and not streams:
        raise invalid("at least one of pattern or streams is required")
    ttl = body.get("lease_ttl_ms", DEFAULT_LEASE_TTL_MS)
    if type(ttl) is not int or not MIN_LEASE_TTL_MS <= ttl <= MAX_LEASE_TTL_MS:
        raise invalid(f"lease_ttl_ms must be an integer from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}")
    webhook_url = None
    if kind == "webhook":
        webhook = body.get("webhook")
        url = webhook.get("url") if isinstance(webhook, dict) else None
        if not isinstance(url, str) or not url or len(url) > MAX_FIELD_BYTES:
            raise invalid("webhook subscriptions require webhook.url")
        webhook_url = url
    wake_stream = None
    if body.get("wake_stream") not in (None, ""):
        wake_stream = stream_path(body["wake_stream"], "wake_stream")
    if kind == "pull-wake" and wake_stream is None:
        raise invalid("pull-wake subscriptions require wake_stream")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_FIELD_BYTES):
        raise invalid(f"description must be a string of at most {MAX_FIELD_BYTES} characters")
    return SubConfig(kind, pattern, tuple(sorted(set(streams))), webhook_url, wake_stream, ttl, description)


def subscription_id(raw: str) -> str:
    if not raw or len(raw.encode()) > 256 or any(ord(c) < 0x21 or c == "\x7f" or c == "/" for c in raw):
        raise invalid("subscription id must be 1-256 printable characters without '/'")
    return raw
