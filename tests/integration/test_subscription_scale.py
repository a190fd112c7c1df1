"""A subscription that links more streams than one wake names: wakes, claims
and webhook bodies name at most WAKE_STREAMS_MAX (1,000) pending streams, the
ones left come in the next wake (none lost, none named twice once acked), and
no transition walks every link (sub_common.lua's pending index, KEYS[6])."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from gateway.keys import subscription_keys
from tests.conftest import GatewayProcess, start_gateway
from tests.integration.test_subscriptions import ENV, ack, claim, url, wait_for, wake_events

WAKE_STREAMS_MAX = 1000  # sub_common.lua
STREAMS = 1_300


@pytest.fixture(scope="module")
def gw(module_redis, tmp_path_factory) -> Iterator[GatewayProcess]:  # type: ignore[no-untyped-def]
    gateway = start_gateway(module_redis.url, tmp_path_factory.mktemp("subscale"), **ENV)
    yield gateway
    gateway.stop()


@pytest.fixture
def rc(module_redis) -> Iterator[redis.Redis]:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(module_redis.url, decode_responses=True)
    yield client
    client.close()


def create_streams(gw: GatewayProcess, http: httpx.Client, names: list[str]) -> None:
    """Each created with one message: an append each, all linked by the pattern."""
    assert {http.put(url(gw, name), json={"n": name}).status_code for name in names} == {201}


def commands_called(rc: redis.Redis, name: str) -> int:
    return int(rc.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_claim_names_at_most_a_thousand_and_the_next_wake_the_rest(gw, http, rc):
    tag = uuid.uuid4().hex[:8]
    sub, wake = f"big-{tag}", f"wake-{tag}/pool"
    assert http.put(url(gw, wake), json=[]).status_code == 201
    body = {"type": "pull-wake", "pattern": f"big-{tag}/*", "wake_stream": wake}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    names = [f"big-{tag}/s{i:05d}" for i in range(STREAMS)]
    hkeys_before = commands_called(rc, "hkeys")
    create_streams(gw, http, names)
    wait_for(lambda: wake_events(gw, http, wake, sub))
    pending_key = subscription_keys(sub).pending
    wait_for(lambda: rc.scard(pending_key) == STREAMS)

    acked: list[str] = []
    rounds = 0
    while True:
        rounds += 1
        answer = claim(gw, http, sub, "worker")
        assert answer.status_code == 200, answer.text
        claimed = answer.json()
        listed = [s["path"] for s in claimed["streams"]]
        assert all(s["has_pending"] for s in claimed["streams"])
        assert len(listed) == min(WAKE_STREAMS_MAX, STREAMS - len(acked))
        assert claimed.get("has_more", False) == (len(acked) + len(listed) < STREAMS)
        assert not set(listed) & set(acked), "a stream acked before is named again"
        acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in claimed["streams"]]
        done = ack(gw, http, sub, claimed, acks)
        assert done.status_code == 200, done.text
        acked += listed
        if not done.json()["next_wake"]:
            break
        assert rounds < 5
    assert sorted(acked) == names  # every one, once
    assert rounds == 2
    assert rc.scard(pending_key) == 0
    # No notify, claim or ack read every link (only deleting does).
    assert commands_called(rc, "hkeys") == hkeys_before


def test_a_subscription_from_before_the_index_gets_it_built_once(gw, http, rc):
    """One created by an earlier version has no pending set: its first wake
    builds it from the links, so nothing pending then is missed."""
    tag = uuid.uuid4().hex[:8]
    sub, wake = f"old-{tag}", f"wake-{tag}/pool"
    assert http.put(url(gw, wake), json=[]).status_code == 201
    body = {"type": "pull-wake", "pattern": f"old-{tag}/*", "wake_stream": wake}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    create_streams(gw, http, [f"old-{tag}/a", f"old-{tag}/b"])
    wait_for(lambda: wake_events(gw, http, wake, sub))
    first = claim(gw, http, sub, "worker").json()
    # Back to an earlier version's state: a wake in flight for the two streams, no index.
    k = subscription_keys(sub)
    rc.delete(k.pending)
    rc.hdel(k.state, "pidx")
    release = ack(gw, http, sub, first, [], action="release")
    assert release.status_code == 204
    # Released with work pending: the next wake (built index) names both again.
    again = wait_for(lambda: claim(gw, http, sub, "worker-2").json().get("streams"))
    assert sorted(s["path"] for s in again) == [f"old-{tag}/a", f"old-{tag}/b"]
    assert rc.hget(k.state, "pidx") == "1"
    assert rc.smembers(k.pending) == {f"old-{tag}/a", f"old-{tag}/b"}


def test_a_webhook_body_names_at_most_a_thousand(gw, http, rc):
    """Webhook receivers answering {"done": true} get every pending stream,
    at most 1,000 a body, each once."""
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            answer = b'{"done": true}'
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tag = uuid.uuid4().hex[:8]
    sub = f"hook-{tag}"
    try:
        hook = {"url": f"http://127.0.0.1:{server.server_port}/hook"}
        body = {"type": "webhook", "pattern": f"hook-{tag}/*", "webhook": hook}
        assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
        names = [f"hook-{tag}/s{i:05d}" for i in range(STREAMS)]
        create_streams(gw, http, names)
        k = subscription_keys(sub)

        def named() -> list[str]:
            return [s["path"] for wake in list(received) for s in wake["streams"]]

        wait_for(lambda: set(named()) == set(names), timeout_s=30)
        wait_for(lambda: rc.scard(k.pending) == 0 and rc.hget(k.state, "wake") == "")
        assert max(len(wake["streams"]) for wake in received) <= WAKE_STREAMS_MAX
        assert len(named()) == len(names), "a stream named again after its done"
        assert http.delete(url(gw, f"__ds/subscriptions/{sub}")).status_code == 204
    finally:
        server.shutdown()
        server.server_close()


def test_a_subscription_answer_lists_a_thousand_links_and_says_how_many(gw, http, module_redis):
    """GET of a subscription linking 1,300 streams answers in pages of about
    1,000 (streams_cursor) with streams_total; `dsgw subscriptions` shows the
    first page and the total: answers built in bounded memory."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    tag = uuid.uuid4().hex[:8]
    sub = f"list-{tag}"
    body = {"type": "pull-wake", "pattern": f"list-{tag}/*", "wake_stream": f"wake-{tag}/pool"}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    names = [f"list-{tag}/s{i:05d}" for i in range(STREAMS)]
    create_streams(gw, http, names)
    wait_for(lambda: http.get(url(gw, f"__ds/subscriptions/{sub}")).json().get("streams_total") == STREAMS)
    # Page by page (streams_cursor), every link, each page about 1,000.
    seen: set[str] = set()
    params: dict[str, str] = {}
    pages = 0
    while pages < 10:
        pages += 1
        answer = http.get(url(gw, f"__ds/subscriptions/{sub}"), params=params).json()
        assert answer["streams_total"] == STREAMS and len(answer["streams"]) <= 2 * 1000
        seen |= {s["path"] for s in answer["streams"]}
        if "streams_cursor" not in answer:
            break
        params = {"streams_cursor": answer["streams_cursor"]}
    assert seen == set(names) and pages >= 2
    bad = http.get(url(gw, f"__ds/subscriptions/{sub}"), params={"streams_cursor": "x"})
    assert bad.status_code == 400
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "subscriptions", "--json"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": module_redis.url},
        capture_output=True,
        timeout=60,
        check=True,
    )
    row = next(r for r in json.loads(out.stdout) if r["id"] == sub)
    assert row["streams_total"] == STREAMS and 1000 <= len(row["streams"]) < STREAMS
    assert http.delete(url(gw, f"__ds/subscriptions/{sub}")).status_code == 204


def test_stale_members_of_the_pending_set_cannot_hide_a_pending_stream(gw, http, rc):
    """Members another version left behind (not linked, or acked since) are
    dropped when sampled, and sampling goes on until a pending one is found."""
    tag = uuid.uuid4().hex[:8]
    sub, wake = f"stale-{tag}", f"wake-{tag}/pool"
    assert http.put(url(gw, wake), json=[]).status_code == 201
    body = {"type": "pull-wake", "pattern": f"stale-{tag}/*", "wake_stream": wake}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    create_streams(gw, http, [f"stale-{tag}/real"])
    wait_for(lambda: wake_events(gw, http, wake, sub))
    first = claim(gw, http, sub, "worker").json()
    k = subscription_keys(sub)
    rc.sadd(k.pending, *(f"stale-{tag}/gone-{i}" for i in range(5_000)))
    assert ack(gw, http, sub, first, [], action="release").status_code == 204
    again = claim(gw, http, sub, "worker-2")
    assert again.status_code == 200, again.text
    assert [s["path"] for s in again.json()["streams"]] == [f"stale-{tag}/real"]
    # Sampled stale members are gone (at least one sample of 1,000 was taken).
    assert rc.sismember(k.pending, f"stale-{tag}/real") and rc.scard(k.pending) <= 4_002
