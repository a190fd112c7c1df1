"""Connecting to Redis: a single server or a Redis Cluster, told apart by
asking the server (INFO cluster), so REDIS_URL may name either. For a cluster,
name any one node: redis://10.0.0.5:7000/0 ."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from .redis_mux import Mux, connect_mux


class FastBlockingConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py wraps get_connection in a deprecation check that inspects the
    call signature on every command (about 6% of an append's CPU); we never
    pass the deprecated arguments, so call the function it wraps."""

    get_connection = aioredis.BlockingConnectionPool.get_connection.__wrapped__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RedisTarget:
    # redis.asyncio.Redis, or RedisCluster where `cluster` is true: pub/sub,
    # workers' consumer groups, inspection. Stream operations go through `mux`.
    client: Any
    cluster: bool
    version: tuple[int, ...]
    mux: Mux

    async def close(self) -> None:
        await self.mux.close()
        await self.client.aclose()

    @property
    def sharded_pubsub(self) -> bool:
        """SPUBLISH/SSUBSCRIBE (Redis 7+): a notification travels only to the
        shard that owns the stream, not to every node of a cluster."""
        return self.version >= (7, 0)

    @property
    def publish_command(self) -> str:
        return "SPUBLISH" if self.sharded_pubsub else "PUBLISH"


async def connect(
    url: str, *, max_connections: int, pool_timeout_s: float = 10.0, name: str = "", timeout_s: float = 5.0
) -> RedisTarget:
    """`timeout_s`: how long a stream operation waits for Redis before it fails
    (never resent: see redis_mux)."""
    client_name = name or f"dsgw-{os.getpid()}"
    probe = aioredis.Redis.from_url(url)
    try:
        info = await probe.info("server")
        cluster_info = await probe.info("cluster")
    finally:
        await probe.aclose()
    version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:3])
    if cluster_info.get("cluster_enabled") in (1, "1"):
        # Per node; cluster clients have no blocking pool, so keep it roomy.
        client = RedisCluster.from_url(
            url, max_connections=max(max_connections, 256), client_name=client_name
        )
        await client.initialize()
        mux = await connect_mux(url, cluster=True, timeout_s=timeout_s, client_name=client_name)
        return RedisTarget(client, True, version, mux)
    # A blocking pool makes a burst of requests queue for a connection instead
    # of failing with "too many connections" (the default pool's behaviour).
    pool = FastBlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        health_check_interval=30,
        client_name=client_name,
    )
    mux = await connect_mux(url, cluster=False, timeout_s=timeout_s, client_name=client_name)
    return RedisTarget(aioredis.Redis(connection_pool=pool), False, version, mux)


async def reset_after(client: Any, exc: BaseException) -> None:
    """A cluster client that let a MOVED/ASK or cluster error escape holds a
    slot map it cannot repair: drop its connections, so the next command
    fetches the topology afresh."""
    from redis.exceptions import AskError, ClusterDownError, ClusterError, MovedError, SlotNotCoveredError

    if isinstance(client, RedisCluster) and isinstance(
        exc, MovedError | AskError | ClusterError | ClusterDownError | SlotNotCoveredError
    ):
        await client.aclose()
