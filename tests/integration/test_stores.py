"""Streams created outside the gateway (the Postgres source worker, `dsgw
publish`) are created like the gateway's own (gateway/stores.py): linked to
the pattern subscriptions they match before their first message, and tiered
when retention is on."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import redis

from gateway.keys import stream_keys
from gateway.redis_client import connect
from gateway.settings import Settings
from gateway.stores import configured_store


def test_a_stream_created_by_a_worker_is_linked_to_matching_pattern_subscriptions(
    gateway, redis_server, monkeypatch
):
    tag = uuid.uuid4().hex[:8]
    sub = f"workers-{tag}"
    body = {"type": "pull-wake", "pattern": f"src-{tag}/*", "wake_stream": f"wake-{tag}"}
    created = httpx.put(f"{gateway.url}/v1/stream/__ds/subscriptions/{sub}", json=body)
    assert created.status_code == 201, created.text
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("DSGW_RETAIN_MESSAGES", "100")

    async def create_like_the_source_worker() -> None:
        target = await connect(redis_server.url, max_connections=2)
        try:
            store = configured_store(target.mux, target.publish_command, Settings.from_env())
            await store.create_json_stream(f"src-{tag}/orders")
        finally:
            await target.close()

    asyncio.run(create_like_the_source_worker())
    rc = redis.Redis.from_url(redis_server.url)
    keys = stream_keys(f"src-{tag}/orders")
    assert rc.smembers(keys.subs) == {sub.encode()}  # linked at creation, before any message
    assert rc.hget(keys.meta, "tier") == b"1"  # retention on: tiered like the gateway's streams
    assert httpx.delete(f"{gateway.url}/v1/stream/__ds/subscriptions/{sub}").status_code == 204
