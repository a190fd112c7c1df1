"""Worker settings, from environment variables (documented in README.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from gateway.settings import env_int, env_opt_int


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str = ""
    database_url: str = ""
    # Entries per sink batch (one Postgres transaction).
    sink_batch: int = 2000
    # Bytes per sink batch: a batch ends before the entry that would pass
    # this (an entry bigger than this goes alone), however big messages are.
    sink_batch_bytes: int = 16 * 1024 * 1024
    # The longest an idle shard's feed waits between two reads: the bound on
    # how late the sink notices the first append to an idle shard.
    sink_block_ms: int = 1000
    # Batches written to Postgres at once (one connection each), whatever the shard count.
    sink_writers: int = 4
    # Feed bytes a sink holds at once (read ahead or being written), reserved
    # before every read; 0: twice sink_batch_bytes. See sink_inflight_budget.
    sink_inflight_bytes: int = 0
    # Feed entries delivered to a consumer that has not acknowledged them for
    # this long are taken over (the consumer is presumed dead).
    sink_claim_idle_ms: int = 30_000
    # A shard that has not finished a round for this long makes /healthz 503.
    sink_stall_ms: int = 30_000
    # Outbox rows per source round.
    source_batch: int = 500
    # Most changes, and bytes, in one append of the source worker: a bigger
    # transaction becomes several appends (each one Lua script).
    source_max_append_messages: int = 1000
    source_max_append_bytes: int = 1024 * 1024
    # Port for /healthz and /metrics of this worker (0: none), and its address.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    consumer_name: str = ""
    # Tiered history (issue 11): the sink trims Redis to at most this many
    # messages / seconds per tiered stream, never above what it committed.
    retain_messages: int | None = None
    retain_seconds: int | None = None
    # How often the sink looks for streams whose oldest entries aged out.
    trim_sweep_ms: int = 1000

    @property
    def sink_inflight_budget(self) -> int:
        """The bound on feed bytes read and not yet written (one entry bigger
        than it is still read, alone)."""
        return self.sink_inflight_bytes if self.sink_inflight_bytes > 0 else 2 * self.sink_batch_bytes

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            redis_url=os.environ.get("REDIS_URL", ""),
            database_url=os.environ.get("DATABASE_URL", ""),
            sink_batch=env_int("DSGW_SINK_BATCH", cls.sink_batch),
            sink_batch_bytes=env_int("DSGW_SINK_BATCH_BYTES", cls.sink_batch_bytes),
            sink_block_ms=env_int("DSGW_SINK_BLOCK_MS", cls.sink_block_ms),
            sink_writers=env_int("DSGW_SINK_WRITERS", cls.sink_writers),
            sink_inflight_bytes=env_int("DSGW_SINK_INFLIGHT_BYTES", cls.sink_inflight_bytes),
            sink_claim_idle_ms=env_int("DSGW_SINK_CLAIM_IDLE_MS", cls.sink_claim_idle_ms),
            sink_stall_ms=env_int("DSGW_SINK_STALL_MS", cls.sink_stall_ms),
            source_batch=env_int("DSGW_SOURCE_BATCH", cls.source_batch),
            source_max_append_messages=env_int(
                "DSGW_SOURCE_MAX_APPEND_MESSAGES", cls.source_max_append_messages
            ),
            source_max_append_bytes=env_int("DSGW_SOURCE_MAX_APPEND_BYTES", cls.source_max_append_bytes),
            metrics_port=env_int("DSGW_WORKER_METRICS_PORT", cls.metrics_port),
            metrics_host=os.environ.get("DSGW_WORKER_METRICS_HOST", "") or cls.metrics_host,
            consumer_name=os.environ.get("DSGW_CONSUMER_NAME", "") or f"{socket.gethostname()}-{os.getpid()}",
            retain_messages=env_opt_int("DSGW_RETAIN_MESSAGES"),
            retain_seconds=env_opt_int("DSGW_RETAIN_SECONDS"),
            trim_sweep_ms=env_int("DSGW_TRIM_SWEEP_MS", cls.trim_sweep_ms),
        )
