"""Worker settings, from environment variables (documented in README.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from gateway.settings import env_int


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str = ""
    database_url: str = ""
    # Entries per sink batch (one Postgres transaction).
    sink_batch: int = 2000
    # How long a sink read blocks waiting for new feed entries.
    sink_block_ms: int = 1000
    # Feed entries delivered to a consumer that has not acknowledged them for
    # this long are taken over (the consumer is presumed dead).
    sink_claim_idle_ms: int = 30_000
    # Outbox rows per source round.
    source_batch: int = 500
    # Port for /healthz and /metrics of this worker (0: none), and its address.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    consumer_name: str = ""

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            redis_url=os.environ.get("REDIS_URL", ""),
            database_url=os.environ.get("DATABASE_URL", ""),
            sink_batch=env_int("DSGW_SINK_BATCH", cls.sink_batch),
            sink_block_ms=env_int("DSGW_SINK_BLOCK_MS", cls.sink_block_ms),
            sink_claim_idle_ms=env_int("DSGW_SINK_CLAIM_IDLE_MS", cls.sink_claim_idle_ms),
            source_batch=env_int("DSGW_SOURCE_BATCH", cls.source_batch),
            metrics_port=env_int("DSGW_WORKER_METRICS_PORT", cls.metrics_port),
            metrics_host=os.environ.get("DSGW_WORKER_METRICS_HOST", "") or cls.metrics_host,
            consumer_name=os.environ.get("DSGW_CONSUMER_NAME", "") or f"{socket.gethostname()}-{os.getpid()}",
        )
