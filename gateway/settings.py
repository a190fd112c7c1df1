"""One settings object, read from environment variables (documented in README.md)."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field, fields


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_opt_int(name: str) -> int | None:
    """An optional count (unset or empty: None); negative is a configuration error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    value = int(raw)
    if value < 0:
        raise ValueError(f"{name} must be 0 or more")
    return value


def _str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _allow_private() -> str:
    from .subscriptions.urlsafety import LEVELS

    value = _str("DSGW_WEBHOOK_ALLOW_PRIVATE", "false").lower()
    if value not in LEVELS:
        raise ValueError(f"DSGW_WEBHOOK_ALLOW_PRIVATE must be one of {', '.join(LEVELS)} (got {value!r})")
    return value


def _list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else default


def _history_url() -> str:
    url = _str("DSGW_HISTORY_DATABASE_URL", "") or _str("DATABASE_URL", "")
    return "" if url == "-" else url


@dataclass(frozen=True)
class Settings:
    # Where the streams live. Empty: `dsgw dev` / `make run` start an embedded Redis.
    redis_url: str = ""
    # Connections per gateway process; waiting requests queue for one (never fail).
    redis_max_connections: int = 64
    # How long a request waits for a free Redis connection before a 503.
    redis_pool_timeout_s: float = 10.0
    # How long a stream operation waits for Redis's answer before a 503. Never
    # resent after that: the client retries under the producer/Stream-Seq rules.
    redis_timeout_ms: int = 5_000
    # Long-poll wait before answering 204 (the conformance run uses 500).
    long_poll_timeout_ms: int = 30_000
    # An SSE connection is closed after this long; clients resume from their offset.
    sse_max_lifetime_ms: int = 60_000
    # An SSE reader that takes no data for this long is cut off (it resumes
    # from its last offset): a stalled client must not pin memory forever.
    sse_send_timeout_ms: int = 10_000
    # Live readers (long-poll + SSE) one gateway process serves at once; more
    # get 503 with Retry-After.
    max_live_connections: int = 10_000
    # SSE keep-alive: a control event after this long without data.
    sse_keepalive_ms: int = 15_000
    # A live reader re-reads the tail after this long even without a notification,
    # so a lost notification delays a message, never loses it.
    live_recheck_ms: int = 5_000
    # Largest request body accepted (413 above it).
    max_body_bytes: int = 8 * 1024 * 1024
    # Most messages in one JSON append (413 above): one append is one Lua
    # script, and Redis runs nothing else while it runs.
    max_append_messages: int = 10_000
    # Idempotent producers: the longest Producer-Id (400 above), the most
    # producers whose state a stream keeps, and how long one must be idle
    # before it may be forgotten once that cap is reached.
    max_producer_id_bytes: int = 256
    max_producers_per_stream: int = 10_000
    producer_idle_s: int = 7 * 86400
    # A catch-up response stops after the append that crosses this many bytes.
    read_chunk_bytes: int = 1024 * 1024
    # ... or after this many Redis entries.
    read_chunk_entries: int = 10_000
    # How often each gateway process removes forks whose TTL or Expires-At
    # passed and that nobody touched since (gateway/sweeper.py).
    fork_sweep_ms: int = 30_000
    # How often Redis memory per shard is measured for /metrics (gateway/shard_stats.py;
    # one process of the deployment measures, all report); 0 = never.
    shard_stats_s: int = 300
    # Access-Control-Allow-Origin values; "*" allows any origin.
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    # Cross-Origin-Resource-Policy on every response.
    cross_origin_resource_policy: str = "cross-origin"
    # Log level for the one-line JSON logs.
    log_level: str = "INFO"
    # One log line per HTTP request (off by default: it costs more than an append).
    access_log: bool = False
    # JSON streams whose messages the Postgres sink receives: comma-separated
    # globs on the stream name, decided when a stream is created; "-" for none.
    sink_streams: list[str] = field(default_factory=lambda: ["*"])
    # Tiered history (issue 11): keep at most this many messages / seconds of
    # each stream in Redis; older ones are read from Postgres stream_history.
    # Either set: every new stream goes to the sync feed. Both None: no trimming.
    retain_messages: int | None = None
    retain_seconds: int | None = None
    # Authentication (gateway/auth.py): on as soon as one credential source is set.
    auth_jwt_secret: str = ""
    auth_jwks: str = ""
    auth_jwks_refresh_s: int = 300
    auth_keys_file: str = ""
    auth_issuer: str = ""
    auth_audience: str = ""
    auth_leeway_s: int = 10
    # Rate limits per credential (or client address), shared through Redis; 0 = off.
    rate_appends_per_s: int = 0
    rate_live_connections: int = 0
    # Webhook delivery (gateway/subscriptions/webhook.py, urlsafety.py). Which
    # non-public targets (and plain http) are allowed: "false" none, "loopback"
    # (development, the conformance runs), "true" all; never for untrusted subscribers.
    webhook_allow_private: str = "false"
    # One delivery: connecting, and everything (resolve, connect, send, response).
    webhook_connect_timeout_ms: int = 3_000
    webhook_timeout_ms: int = 10_000
    # Deliveries in flight at once per gateway process; more wait for a slot.
    webhook_max_concurrency: int = 64
    # How much of a receiver's response is read (enough for {"done": true}).
    webhook_max_response_bytes: int = 4096
    # Largest webhook body sent; a larger one is not delivered (counted as a failure).
    webhook_max_payload_bytes: int = 256 * 1024
    # How often a replica reloads the signing and token keys from Redis (a key
    # rotation publishes its new key this long, and more, before it signs).
    webhook_keys_refresh_s: int = 60
    # Subscriptions (gateway/subscriptions/): the base of the URLs handed out
    # (jwks_url, callback_url), e.g. https://streams.example.com. Required behind a
    # load balancer; empty: the listening address (a single process). Never taken
    # from Host or forwarded headers.
    public_url: str = ""
    # The pause between two looks at the subscription timers; and how often a
    # replica's recovery sweep looks at every subscription.
    subscriptions_poll_ms: int = 500
    subscriptions_sweep_s: int = 30
    # A shard's wake queue is polled when its wake channel says so; every queue
    # (one command per shard) only this often, for notifications that were lost.
    subscriptions_full_poll_ms: int = 5000
    # The web console at /console (gateway/console.py); its data behind auth when auth is on.
    console: bool = True
    # Tiered history (gateway/tiering/): the Postgres database holding
    # stream_history, where reads below a stream's trim point are served from.
    # DSGW_HISTORY_DATABASE_URL, else DATABASE_URL; empty or "-": none, such
    # reads answer 410. Its timeout (connect and query, then 503) and pool size.
    history_database_url: str = ""
    history_timeout_ms: int = 5_000
    history_max_connections: int = 4

    def __post_init__(self) -> None:
        if self.auth_jwt_secret and len(self.auth_jwt_secret.encode()) < 32:
            # RFC 7518: an HS256 key at least as long as the hash (32 bytes).
            raise ValueError("DSGW_AUTH_JWT_SECRET must be at least 32 bytes")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_jwt_secret or self.auth_jwks or self.auth_keys_file)

    @property
    def retention_enabled(self) -> bool:
        return self.retain_messages is not None or self.retain_seconds is not None

    def sink_filter(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.sink_streams)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            redis_url=_str("REDIS_URL", ""),
            redis_max_connections=env_int("DSGW_REDIS_MAX_CONNECTIONS", cls.redis_max_connections),
            redis_pool_timeout_s=float(_str("DSGW_REDIS_POOL_TIMEOUT_S", str(cls.redis_pool_timeout_s))),
            redis_timeout_ms=env_int("DSGW_REDIS_TIMEOUT_MS", cls.redis_timeout_ms),
            long_poll_timeout_ms=env_int("DSGW_LONG_POLL_TIMEOUT_MS", cls.long_poll_timeout_ms),
            sse_max_lifetime_ms=env_int("DSGW_SSE_MAX_LIFETIME_MS", cls.sse_max_lifetime_ms),
            sse_send_timeout_ms=env_int("DSGW_SSE_SEND_TIMEOUT_MS", cls.sse_send_timeout_ms),
            max_live_connections=env_int("DSGW_MAX_LIVE_CONNECTIONS", cls.max_live_connections),
            sse_keepalive_ms=env_int("DSGW_SSE_KEEPALIVE_MS", cls.sse_keepalive_ms),
            live_recheck_ms=env_int("DSGW_LIVE_RECHECK_MS", cls.live_recheck_ms),
            max_body_bytes=env_int("DSGW_MAX_BODY_BYTES", cls.max_body_bytes),
            max_append_messages=env_int("DSGW_MAX_APPEND_MESSAGES", cls.max_append_messages),
            max_producer_id_bytes=env_int("DSGW_MAX_PRODUCER_ID_BYTES", cls.max_producer_id_bytes),
            max_producers_per_stream=env_int("DSGW_MAX_PRODUCERS_PER_STREAM", cls.max_producers_per_stream),
            producer_idle_s=env_int("DSGW_PRODUCER_IDLE_S", cls.producer_idle_s),
            read_chunk_bytes=env_int("DSGW_READ_CHUNK_BYTES", cls.read_chunk_bytes),
            read_chunk_entries=env_int("DSGW_READ_CHUNK_ENTRIES", cls.read_chunk_entries),
            fork_sweep_ms=env_int("DSGW_FORK_SWEEP_MS", cls.fork_sweep_ms),
            shard_stats_s=env_int("DSGW_SHARD_STATS_S", cls.shard_stats_s),
            cors_origins=_list("DSGW_CORS_ORIGINS", ["*"]),
            cross_origin_resource_policy=_str(
                "DSGW_CROSS_ORIGIN_RESOURCE_POLICY", cls.cross_origin_resource_policy
            ),
            log_level=_str("DSGW_LOG_LEVEL", cls.log_level).upper(),
            access_log=_str("DSGW_ACCESS_LOG", "false").lower() in ("1", "true", "yes"),
            sink_streams=[p for p in _list("DSGW_SINK_STREAMS", ["*"]) if p != "-"],
            retain_messages=env_opt_int("DSGW_RETAIN_MESSAGES"),
            retain_seconds=env_opt_int("DSGW_RETAIN_SECONDS"),
            auth_jwt_secret=os.environ.get("DSGW_AUTH_JWT_SECRET", ""),
            auth_jwks=_str("DSGW_AUTH_JWKS", ""),
            auth_jwks_refresh_s=env_int("DSGW_AUTH_JWKS_REFRESH_S", cls.auth_jwks_refresh_s),
            auth_keys_file=_str("DSGW_AUTH_KEYS_FILE", ""),
            auth_issuer=_str("DSGW_AUTH_ISSUER", ""),
            auth_audience=_str("DSGW_AUTH_AUDIENCE", ""),
            auth_leeway_s=env_int("DSGW_AUTH_LEEWAY_S", cls.auth_leeway_s),
            rate_appends_per_s=env_int("DSGW_RATE_APPENDS_PER_S", cls.rate_appends_per_s),
            rate_live_connections=env_int("DSGW_RATE_LIVE_CONNECTIONS", cls.rate_live_connections),
            webhook_allow_private=_allow_private(),
            webhook_connect_timeout_ms=env_int(
                "DSGW_WEBHOOK_CONNECT_TIMEOUT_MS", cls.webhook_connect_timeout_ms
            ),
            webhook_timeout_ms=env_int("DSGW_WEBHOOK_TIMEOUT_MS", cls.webhook_timeout_ms),
            webhook_max_concurrency=env_int("DSGW_WEBHOOK_MAX_CONCURRENCY", cls.webhook_max_concurrency),
            webhook_max_response_bytes=env_int(
                "DSGW_WEBHOOK_MAX_RESPONSE_BYTES", cls.webhook_max_response_bytes
            ),
            webhook_max_payload_bytes=env_int(
                "DSGW_WEBHOOK_MAX_PAYLOAD_BYTES", cls.webhook_max_payload_bytes
            ),
            webhook_keys_refresh_s=env_int("DSGW_WEBHOOK_KEYS_REFRESH_S", cls.webhook_keys_refresh_s),
            public_url=_str("DSGW_PUBLIC_URL", ""),
            subscriptions_poll_ms=env_int("DSGW_SUBSCRIPTIONS_POLL_MS", cls.subscriptions_poll_ms),
            subscriptions_sweep_s=env_int("DSGW_SUBSCRIPTIONS_SWEEP_S", cls.subscriptions_sweep_s),
            subscriptions_full_poll_ms=env_int(
                "DSGW_SUBSCRIPTIONS_FULL_POLL_MS", cls.subscriptions_full_poll_ms
            ),
            console=_str("DSGW_CONSOLE", "true").lower() in ("1", "true", "yes"),
            history_database_url=_history_url(),
            history_timeout_ms=env_int("DSGW_HISTORY_TIMEOUT_MS", cls.history_timeout_ms),
            history_max_connections=env_int("DSGW_HISTORY_MAX_CONNECTIONS", cls.history_max_connections),
        )

    def describe(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
