"""Subscriptions across two gateway processes sharing one real Redis: pull-wake
claims, fencing, lease expiry, pattern links, a dispatcher dying mid-way, and
the persisted webhook retry schedule. Every wait is a bounded poll for a
condition, never a fixed sleep."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis

from gateway import keys
from gateway.embedded import start_redis
from gateway.scripts import script_source
from tests.conftest import GatewayProcess, start_gateway

ENV = {"DSGW_WEBHOOK_ALLOW_PRIVATE": "true", "DSGW_SUBSCRIPTIONS_POLL_MS": "50"}


@pytest.fixture(scope="module")
def pair(module_redis, tmp_path_factory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    a = start_gateway(module_redis.url, tmp_path_factory.mktemp("suba"), **ENV)
    b = start_gateway(module_redis.url, tmp_path_factory.mktemp("subb"), **ENV)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def rc(module_redis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(module_redis.url)
    yield client
    client.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, "condition not met in time"
            return value
        time.sleep(0.05)


def url(gw: GatewayProcess, path: str) -> str:
    return f"{gw.url}/v1/stream/{path}"


def pull_setup(gw: GatewayProcess, http: httpx.Client, ttl_ms: int = 30_000) -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    sub, wake, stream = f"pull-{tag}", f"wake-{tag}/pool", f"ev-{tag}/one"
    assert (
        http.put(url(gw, wake), content=b"[]", headers={"content-type": "application/json"}).status_code
        == 201
    )
    body = {"type": "pull-wake", "pattern": f"ev-{tag}/*", "wake_stream": wake, "lease_ttl_ms": ttl_ms}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    return sub, wake, stream


def woken_pull(
    http: httpx.Client,
    gw: GatewayProcess,
    append_on: GatewayProcess | None = None,
    seen_on: GatewayProcess | None = None,
    ttl_ms: int = 30_000,
) -> tuple[str, str, str]:
    """pull_setup on `gw`, one append to the linked stream (through `append_on`),
    and its wake event seen on the wake stream (through `seen_on`)."""
    sub, wake, stream = pull_setup(gw, http, ttl_ms=ttl_ms)
    http.put(url(append_on or gw, stream), json={"n": 1})
    wait_for(lambda: wake_events(seen_on or gw, http, wake, sub))
    return sub, wake, stream


def wake_events(gw: GatewayProcess, http: httpx.Client, wake: str, sub: str) -> list[dict[str, Any]]:
    return [e for e in http.get(url(gw, wake)).json() if e.get("subscription_id") == sub]


def claim(gw: GatewayProcess, http: httpx.Client, sub: str, worker: str) -> httpx.Response:
    return http.post(url(gw, f"__ds/subscriptions/{sub}/claim"), json={"worker": worker})


def ack(gw, http, sub, claimed, acks, done=True, action="ack") -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"wake_id": claimed["wake_id"], "generation": claimed["generation"], "acks": acks, "done": done}
    headers = {"authorization": f"Bearer {claimed['token']}"}
    return http.post(url(gw, f"__ds/subscriptions/{sub}/{action}"), json=body, headers=headers)


def test_a_claim_on_one_replica_is_seen_on_the_other(pair, http):
    a, b = pair
    sub, wake, stream = woken_pull(http, a, append_on=b)  # created with a body on B: counts as an append
    first = claim(a, http, sub, "worker-a")
    assert first.status_code == 200
    claimed = first.json()
    busy = claim(b, http, sub, "worker-b")
    assert busy.status_code == 409
    assert busy.json()["error"] == {
        "code": "ALREADY_CLAIMED",
        "message": "another worker holds the lease",
        "current_holder": "worker-a",
        "generation": claimed["generation"],
    }
    tail = next(s for s in claimed["streams"] if s["path"] == stream)["tail_offset"]
    # The token issued by A is honoured by B (keys and wake state are in Redis).
    done = ack(b, http, sub, claimed, [{"stream": stream, "offset": tail}])
    assert (done.status_code, done.json()) == (200, {"ok": True, "next_wake": False})
    got = http.get(url(a, f"__ds/subscriptions/{sub}")).json()
    assert [(s["path"], s["acked_offset"]) for s in got["streams"]] == [(stream, tail)]


def test_stale_acks_are_fenced_and_heartbeats_extend_the_lease(pair, http):
    a, b = pair
    sub, wake, stream = woken_pull(http, a, seen_on=b)
    claimed = claim(b, http, sub, "w").json()
    heartbeat = ack(a, http, sub, claimed, [], done=False)
    assert heartbeat.json() == {"ok": True, "next_wake": False}
    wrong_wake = dict(claimed, wake_id="w_0000")
    assert ack(a, http, sub, wrong_wake, []).json()["error"]["code"] == "FENCED"
    wrong_gen = dict(claimed, generation=claimed["generation"] + 1)
    assert ack(a, http, sub, wrong_gen, []).json()["error"]["code"] == "FENCED"
    assert ack(a, http, sub, claimed, [], done=True).status_code == 200
    replay = ack(b, http, sub, claimed, [], done=True)
    assert (replay.status_code, replay.json()["error"]["code"]) == (409, "FENCED")
    assert ack(b, http, sub, claimed, [], action="release").json()["error"]["code"] == "FENCED"
    forged = dict(claimed, token=claimed["token"][:-4] + "AAAA")
    assert ack(b, http, sub, forged, []).json()["error"]["code"] == "TOKEN_INVALID"


def test_acks_are_checked_against_cursor_and_tail(pair, http):
    a, _ = pair
    sub, wake, stream = woken_pull(http, a)
    claimed = claim(a, http, sub, "w").json()
    beyond = ack(a, http, sub, claimed, [{"stream": stream, "offset": "9999999999999999_0000000000000000"}])
    assert (beyond.status_code, beyond.json()["error"]["code"]) == (409, "INVALID_OFFSET")
    unknown = ack(
        a, http, sub, claimed, [{"stream": "not/linked", "offset": "0000000000000000_0000000000000000"}]
    )
    assert unknown.json()["error"]["code"] == "INVALID_OFFSET"
    bad = ack(a, http, sub, claimed, "nope")
    assert bad.status_code == 400


def test_an_expired_lease_fences_its_holder_and_wakes_again(pair, http):
    a, b = pair
    sub, wake, stream = woken_pull(http, a, ttl_ms=1000)
    claimed = claim(a, http, sub, "slow-worker").json()
    # Nobody acks: the lease runs out, a replica's timer clears the holder and,
    # work still pending, writes a new wake (next generation) to the wake stream.
    events = wait_for(
        lambda: [e for e in wake_events(b, http, wake, sub) if e["generation"] > claimed["generation"]]
    )
    assert events[0]["stream"] == stream
    late = ack(b, http, sub, claimed, [], done=True)
    assert (late.status_code, late.json()["error"]["code"]) == (409, "FENCED")
    again = claim(b, http, sub, "other-worker")
    assert again.status_code == 200
    assert again.json()["generation"] > claimed["generation"]


def test_release_wakes_again_while_work_is_pending(pair, http):
    a, b = pair
    sub, wake, stream = woken_pull(http, a)
    claimed = claim(a, http, sub, "w").json()
    released = ack(b, http, sub, claimed, [], action="release")
    assert released.status_code == 204
    wait_for(lambda: [e for e in wake_events(a, http, wake, sub) if e["generation"] > claimed["generation"]])


def test_pattern_links_existing_streams_at_their_tail_and_new_ones_before_their_first_entry(pair, http):
    a, b = pair
    tag = uuid.uuid4().hex[:8]
    old = f"pat-{tag}/old"
    http.put(url(a, old), json={"history": True})
    wake = f"wake-{tag}"
    http.put(url(a, wake), content=b"[]", headers={"content-type": "application/json"})
    sub = f"pat-{tag}"
    body = {"type": "pull-wake", "pattern": f"pat-{tag}/*", "wake_stream": wake}
    created = http.put(url(b, f"__ds/subscriptions/{sub}"), json=body).json()
    # The existing stream is linked at its tail: its history is not pending.
    tail = http.head(url(a, old)).headers["stream-next-offset"]
    assert created["streams"] == [{"path": old, "link_type": "glob", "acked_offset": tail}]
    assert claim(a, http, sub, "w").json()["error"]["code"] == "NO_PENDING_WORK"
    # A new stream, created empty, is linked at creation; its first append wakes.
    new = f"pat-{tag}/new"
    http.put(url(a, new), content=b"", headers={"content-type": "application/json"})
    http.post(url(b, new), json={"first": True})
    event = wait_for(lambda: wake_events(a, http, wake, sub))[0]
    assert event["stream"] == new
    streams = {s["path"]: s for s in claim(a, http, sub, "w").json()["streams"]}
    assert streams[new]["has_pending"] and not streams[old]["has_pending"]


def test_explicit_links_are_added_and_removed_and_globs_survive(pair, http):
    a, _ = pair
    tag = uuid.uuid4().hex[:8]
    sub = f"ex-{tag}"
    body = {
        "type": "pull-wake",
        "pattern": f"ex-{tag}/*",
        "streams": [f"ex-{tag}/a"],
        "wake_stream": f"w-{tag}",
    }
    assert http.put(url(a, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    assert (
        http.put(url(a, f"__ds/subscriptions/{sub}"), json=dict(body, lease_ttl_ms=5000)).status_code == 409
    )
    add = http.post(url(a, f"__ds/subscriptions/{sub}/streams"), json={"streams": ["other/b"]})
    assert add.status_code == 204
    links = {
        s["path"]: s["link_type"] for s in http.get(url(a, f"__ds/subscriptions/{sub}")).json()["streams"]
    }
    assert links == {f"ex-{tag}/a": "explicit", "other/b": "explicit"}
    assert http.delete(url(a, f"__ds/subscriptions/{sub}/streams/other%2Fb")).status_code == 204
    assert http.delete(url(a, f"__ds/subscriptions/{sub}/streams/other%2Fb")).status_code == 204
    # ex-<tag>/a also matches the pattern: removing its explicit link leaves the glob link.
    http.delete(url(a, f"__ds/subscriptions/{sub}/streams/ex-{tag}%2Fa"))
    links = {
        s["path"]: s["link_type"] for s in http.get(url(a, f"__ds/subscriptions/{sub}")).json()["streams"]
    }
    assert links == {f"ex-{tag}/a": "glob"}
    assert http.delete(url(a, f"__ds/subscriptions/{sub}")).status_code == 204
    assert http.get(url(a, f"__ds/subscriptions/{sub}")).json()["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


@pytest.mark.parametrize(
    "body",
    [
        {"type": "nope", "streams": ["a"]},
        {"type": "pull-wake", "wake_stream": "w"},
        {"type": "pull-wake", "streams": ["a"]},
        {"type": "webhook", "streams": ["a"]},
        {"type": "pull-wake", "streams": ["a"], "wake_stream": "w", "lease_ttl_ms": 10},
        {"type": "pull-wake", "streams": [""], "wake_stream": "w"},
        [],
    ],
)
def test_bad_subscriptions_get_invalid_request(pair, http, body):
    a, _ = pair
    res = http.put(url(a, "__ds/subscriptions/bad"), json=body)
    assert (res.status_code, res.json()["error"]["code"]) == (400, "INVALID_REQUEST")


def test_control_paths_are_never_streams(pair, http):
    a, _ = pair
    assert http.put(url(a, "__ds/other"), json={}).json()["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"
    assert http.put(url(a, "__ds/subscriptions/x/claim"), json={}).status_code == 405
    res = http.put(
        url(a, "__ds/subscriptions/x"), content=b"{not json", headers={"content-type": "application/json"}
    )
    assert res.status_code == 400


def explicit_pull_setup(
    gw: GatewayProcess, http: httpx.Client, prefix: str, *, create_stream: bool = True
) -> tuple[str, str, str]:
    """A pull-wake subscription linked explicitly to one stream, created empty
    first (or not yet: then created later, after the link)."""
    tag = uuid.uuid4().hex[:8]
    sub, wake, stream = f"{prefix}-{tag}", f"wake-{tag}", f"{prefix}-{tag}/s"
    for path in (wake, stream) if create_stream else (wake,):
        assert (
            http.put(url(gw, path), content=b"[]", headers={"content-type": "application/json"}).status_code
            == 201
        )
    body = {"type": "pull-wake", "streams": [stream], "wake_stream": wake}
    assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    return sub, wake, stream


def append_unannounced(
    gw: GatewayProcess, http: httpx.Client, rc: redis.Redis, stream: str, sub: str
) -> None:
    """Append to `stream` and queue its wake as append.lua would, but with the
    wake channel's notification lost: the link is taken away for the append
    (nothing queued, nothing published), then restored and the wake queued by hand."""
    sk = keys.stream_keys(stream)
    assert rc.srem(sk.subs, sub) == 1
    assert http.post(url(gw, stream), json={"unannounced": True}).status_code == 204
    rc.sadd(sk.subs, sub)
    rc.zadd(sk.wakes, {stream: int(time.time() * 1000)})


@contextlib.contextmanager
def lone_gateway(tmp_path: Any, full_poll_ms: int) -> Iterator[tuple[Any, redis.Redis, GatewayProcess]]:
    """A Redis of its own (no other gateway's dispatcher touches its wake
    queues) and one gateway on it that polls every queue every `full_poll_ms`."""
    server = start_redis(tmp_path / "redis", persistent=False)
    rc = redis.Redis.from_url(server.url)
    gw: GatewayProcess | None = None
    try:
        gw = start_gateway(
            server.url, tmp_path, **dict(ENV, DSGW_SUBSCRIPTIONS_FULL_POLL_MS=str(full_poll_ms))
        )
        yield server, rc, gw
    finally:
        if gw is not None:
            gw.stop()
        rc.close()
        server.stop()


def test_a_wake_is_not_lost_when_the_dispatcher_dies_after_taking_it(tmp_path, http):
    # The first gateway's dispatcher polls every queue once an hour and hears no
    # notification of this wake, which only this test and a second gateway touch.
    with lone_gateway(tmp_path, 3_600_000) as (server, rc, slow):
        sub, wake, stream = explicit_pull_setup(slow, http, "lost")
        append_unannounced(slow, http, rc, stream, sub)
        queue = keys.stream_keys(stream).wakes
        # A dispatcher takes the entry (re-scored 2 s ahead) and dies before telling anyone.
        taken = rc.eval(script_source("sub_queue_take"), 1, queue, int(time.time() * 1000), 2000, 1000)
        assert stream.encode() in taken
        assert wake_events(slow, http, wake, sub) == []
        # Another replica finds it once it falls due again, and wakes the subscription.
        other = start_gateway(server.url, tmp_path, **ENV)
        try:
            events = wait_for(lambda: wake_events(other, http, wake, sub))
            assert events[0]["stream"] == stream
            wait_for(lambda: rc.zscore(queue, stream) is None)
        finally:
            other.stop()


def test_appends_wake_through_the_wake_channel_long_before_the_full_poll(tmp_path, http):
    """append.lua and create.lua publish on the shard's wake channel: the
    dispatcher polls that shard at once, though its round over every queue
    comes only once a minute here (after the one at start)."""
    with lone_gateway(tmp_path, 60_000) as (_, _, gw):
        sub, wake, stream = explicit_pull_setup(gw, http, "chan", create_stream=False)
        # Created with a body after the link: create.lua queues and publishes.
        assert http.put(url(gw, stream), json={"n": 1}).status_code == 201
        first = wait_for(lambda: wake_events(gw, http, wake, sub), timeout_s=10)
        assert first[0]["stream"] == stream
        claimed = claim(gw, http, sub, "w").json()
        tail = next(s for s in claimed["streams"] if s["path"] == stream)["tail_offset"]
        assert ack(gw, http, sub, claimed, [{"stream": stream, "offset": tail}]).json()["next_wake"] is False
        # An append: append.lua queues and publishes.
        assert http.post(url(gw, stream), json={"n": 2}).status_code == 204
        later = wait_for(
            lambda: [e for e in wake_events(gw, http, wake, sub) if e["generation"] > claimed["generation"]],
            timeout_s=10,
        )
        assert later[0]["stream"] == stream


def test_the_full_poll_finds_a_wake_whose_notification_was_lost(tmp_path, http):
    with lone_gateway(tmp_path, 1000) as (_, rc, gw):
        sub, wake, stream = explicit_pull_setup(gw, http, "unheard")
        append_unannounced(gw, http, rc, stream, sub)
        events = wait_for(lambda: wake_events(gw, http, wake, sub))
        assert events[0]["stream"] == stream
        wait_for(lambda: rc.zscore(keys.stream_keys(stream).wakes, stream) is None)


def test_a_pubsub_reconnect_polls_every_queue(tmp_path, http):
    """Notifications published while the pub/sub connection is down are lost:
    when the hub is back it bumps every channel, and the dispatcher polls
    every queue then, not a minute later at its next full round."""
    with lone_gateway(tmp_path, 60_000) as (_, rc, gw):
        sub, wake, stream = explicit_pull_setup(gw, http, "reconn")
        append_unannounced(gw, http, rc, stream, sub)
        assert rc.client_kill_filter(_type="pubsub") >= 1
        events = wait_for(lambda: wake_events(gw, http, wake, sub), timeout_s=10)
        assert events[0]["stream"] == stream


def test_failed_webhook_deliveries_back_off_on_a_schedule_kept_in_redis(pair, http, rc):
    a, _ = pair
    tag = uuid.uuid4().hex[:8]
    sub = f"hook-{tag}"
    # Nothing listens there: every delivery fails.
    body = {"type": "webhook", "streams": [f"hook-{tag}/s"], "webhook": {"url": "http://127.0.0.1:9/hook"}}
    assert http.put(url(a, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    http.put(url(a, f"hook-{tag}/s"), json={"n": 1})
    state_key = keys.subscription_keys(sub).state
    wait_for(lambda: int(rc.hget(state_key, "retries") or 0) >= 2)
    state = {k.decode(): v.decode() for k, v in rc.hgetall(state_key).items()}
    assert state["status"] == "failed" and state["wake"]
    due_in_ms = int(state["due"]) - int(time.time() * 1000)
    # The next attempt is persisted: 2 s (then 4 s, ...) +-20% after the last failure, still ahead.
    assert 0 < due_in_ms <= 4800
    assert rc.zscore(keys.SUB_TIMERS, sub) is not None
    assert http.get(url(a, f"__ds/subscriptions/{sub}")).json()["status"] == "failed"
    http.delete(url(a, f"__ds/subscriptions/{sub}"))


def test_dsgw_subscriptions_lists_cursors_and_wake_state(pair, http, module_redis):
    a, _ = pair
    sub, wake, stream = woken_pull(http, a)
    claim(a, http, sub, "lister")
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "subscriptions", "--json"],
        env={**os.environ, "REDIS_URL": module_redis.url},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    row = next(r for r in json.loads(out.stdout) if r["id"] == sub)
    assert (row["type"], row["target"], row["holder"], row["generation"]) == ("pull-wake", wake, "lister", 1)
    assert [(s["path"], s["link"], s["acked"]) for s in row["streams"]] == [(stream, "glob", "-1")]


def test_metrics_count_deliveries_claims_and_subscriptions(pair, http):
    a, _ = pair
    sub, wake, stream = woken_pull(http, a)
    claim(a, http, sub, "w")

    def metric(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    # The recovery sweep samples the gauges; deliveries and claims count at once (on either replica).
    def counted() -> bool:
        texts = [http.get(f"{gw.url}/metrics").text for gw in pair]
        return (
            sum(
                metric(t, 'dsgw_subscription_deliveries_total{outcome="sent",type="pull-wake"}')
                for t in texts
            )
            >= 1
            and sum(metric(t, "dsgw_subscription_claims_total") for t in texts) >= 1
            and sum(metric(t, "dsgw_subscription_wakes_total") for t in texts) >= 1
        )

    wait_for(counted)
    assert "dsgw_subscriptions " in http.get(f"{a.url}/metrics").text


def test_with_auth_on_managing_needs_manage_and_callbacks_need_only_their_token(module_redis, tmp_path, http):
    import jwt

    secret = "subscription-test-secret-" + "x" * 32
    gw = start_gateway(module_redis.url, tmp_path, **dict(ENV, DSGW_AUTH_JWT_SECRET=secret))

    def token(ds: dict[str, list[str]]) -> dict[str, str]:
        claims = {"sub": "t", "exp": int(time.time()) + 600, "ds": ds}
        return {"authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    try:
        tag = uuid.uuid4().hex[:8]
        sub = f"auth-{tag}"
        body = {"type": "pull-wake", "streams": [f"auth-{tag}/s"], "wake_stream": f"auth-{tag}/w"}
        assert http.get(url(gw, "__ds/jwks.json")).status_code == 200  # public: receivers fetch it
        assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 401
        reader = token({"read": ["__ds/subscriptions/*"]})
        assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body, headers=reader).status_code == 403
        manager = token(
            {"manage": [f"__ds/subscriptions/{sub}", f"auth-{tag}/**"], "read": ["**"], "append": ["**"]}
        )
        assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body, headers=manager).status_code == 201
        assert http.get(url(gw, f"__ds/subscriptions/{sub}"), headers=reader).status_code == 200
        assert http.post(url(gw, f"__ds/subscriptions/{sub}/claim"), json={"worker": "w"}).status_code == 401
        http.put(
            url(gw, f"auth-{tag}/w"), content=b"[]", headers={**manager, "content-type": "application/json"}
        )
        http.put(url(gw, f"auth-{tag}/s"), json={"n": 1}, headers=manager)
        claimed = wait_for(
            lambda: (
                (
                    r := http.post(
                        url(gw, f"__ds/subscriptions/{sub}/claim"), json={"worker": "w"}, headers=reader
                    )
                ).status_code
                == 200
                and r.json()
            )
        )
        # The ack carries the wake's token, not a service token.
        acks = [{"stream": st["path"], "offset": st["tail_offset"]} for st in claimed["streams"]]
        done = ack(gw, http, sub, claimed, acks, done=True)
        assert (done.status_code, done.json()) == (200, {"ok": True, "next_wake": False})
    finally:
        gw.stop()


def serve_on_loopback(handler: type) -> tuple[Any, str]:
    """A threaded HTTP server on 127.0.0.1 running `handler`, and its hook URL."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/hook"


def respond(handler: Any, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Receiver:
    """A webhook receiver on 127.0.0.1 that records deliveries and answers `answer`."""

    def __init__(self, answer: bytes = b"{}") -> None:
        from http.server import BaseHTTPRequestHandler

        received = self.received = []  # type: ignore[var-annotated]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append(json.loads(body))
                respond(self, 200, answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server, self.url = serve_on_loopback(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_webhook_lease_that_runs_out_wakes_again_and_fences_the_old_wake(pair, http):
    a, b = pair
    receiver = Receiver()
    tag = uuid.uuid4().hex[:8]
    sub, stream = f"lease-{tag}", f"lease-{tag}/s"
    try:
        body = {
            "type": "webhook",
            "streams": [stream],
            "webhook": {"url": receiver.url},
            "lease_ttl_ms": 3000,
        }
        assert http.put(url(a, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
        http.put(url(b, stream), json={"n": 1})
        # Accepted ({}), never called back: the lease runs out and a replica delivers a new wake.
        first, second = wait_for(lambda: receiver.received[:2] if len(receiver.received) >= 2 else None)
        assert second["generation"] == first["generation"] + 1 and second["wake_id"] != first["wake_id"]
        assert second["streams"][0]["has_pending"] is True

        def callback(delivery: dict[str, Any], gw: GatewayProcess) -> httpx.Response:
            acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in delivery["streams"]]
            return http.post(
                url(gw, f"__ds/subscriptions/{sub}/callback"),
                headers={"authorization": f"Bearer {delivery['callback_token']}"},
                json={
                    "wake_id": delivery["wake_id"],
                    "generation": delivery["generation"],
                    "acks": acks,
                    "done": True,
                },
            )

        assert callback(first, b).json()["error"]["code"] == "FENCED"
        assert callback(second, b).json() == {"ok": True, "next_wake": False}
    finally:
        http.delete(url(a, f"__ds/subscriptions/{sub}"))
        receiver.close()


def test_a_stream_created_while_the_pattern_registers_is_linked_by_the_second_backfill(pair, http, rc):
    a, _ = pair
    tag = uuid.uuid4().hex[:8]
    sub, wake = f"race-{tag}", f"race-{tag}-wake"
    http.put(url(a, wake), content=b"[]", headers={"content-type": "application/json"})
    body = {"type": "pull-wake", "pattern": f"race-{tag}/*", "wake_stream": wake}
    assert http.put(url(a, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    # A PUT that read the pattern list before the subscription registered it and
    # whose create script runs only now: create.lua with no subscription to link.
    name = f"race-{tag}/late"
    k = keys.stream_keys(name)
    args = ["application/json", "application/json", "1", "", "", "", "", "", "", "", "", "gen", "", name, "", "",
            "", 1, 1, b'{"n": 1}']  # fmt: skip
    assert rc.eval(script_source("create"), len(k.all), *k.all, *args)[0] == b"created"
    assert rc.scard(k.subs) == 0
    # The second backfill (after the Redis timeout) links it before its first entry and wakes.
    event = wait_for(lambda: wake_events(a, http, wake, sub), timeout_s=30)[0]
    assert event["stream"] == name
    streams = {s["path"]: s for s in http.get(url(a, f"__ds/subscriptions/{sub}")).json()["streams"]}
    assert streams[name]["acked_offset"] == "-1"


def test_odd_ids_and_deeply_nested_bodies_get_answers_not_errors(pair, http):
    a, _ = pair
    deep = b"[" * 100_000 + b"]" * 100_000
    res = http.put(
        url(a, "__ds/subscriptions/deep"), content=deep, headers={"content-type": "application/json"}
    )
    assert (res.status_code, res.json()["error"]["code"]) == (400, "INVALID_REQUEST")
    receiver = Receiver()
    sub = f"odd?id#{uuid.uuid4().hex[:6]}"
    try:
        body = {"type": "webhook", "streams": [f"{sub[-6:]}/s"], "webhook": {"url": receiver.url}}
        assert http.put(url(a, f"__ds/subscriptions/{quote(sub, safe='')}"), json=body).status_code == 201
        http.put(url(a, f"{sub[-6:]}/s"), json={"n": 1})
        delivery = wait_for(lambda: receiver.received[:1])[0]
        # The callback URL names the id percent-encoded, and works as given.
        assert delivery["callback_url"].endswith(
            f"/v1/stream/__ds/subscriptions/{quote(sub, safe='')}/callback"
        )
        acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in delivery["streams"]]
        done = http.post(
            delivery["callback_url"],
            headers={"authorization": f"Bearer {delivery['callback_token']}"},
            json={
                "wake_id": delivery["wake_id"],
                "generation": delivery["generation"],
                "acks": acks,
                "done": True,
            },
        )
        assert done.json() == {"ok": True, "next_wake": False}
    finally:
        http.delete(url(a, f"__ds/subscriptions/{quote(sub, safe='')}"))
        receiver.close()


def test_a_timer_rearmed_during_a_tick_is_not_dropped(rc):
    timers = f"test-timers-{uuid.uuid4().hex[:6]}"
    now = int(time.time() * 1000)
    rc.zadd(timers, {"s1": now - 10, "s2": now - 5})
    taken = rc.eval(script_source("sub_timers_take"), 1, timers, now, 15_000, 10)
    assert sorted(taken) == [b"s1", b"s2"]
    assert rc.zscore(timers, "s1") == now + 15_000  # claimed by re-scoring, not removed
    rc.zadd(timers, {"s2": now + 500}, lt=True)  # a transition re-arms s2 during the tick
    done = script_source("sub_timers_done")
    assert rc.eval(done, 1, timers, "s1", now + 15_000) == 1
    assert rc.eval(done, 1, timers, "s2", now + 15_000) == 0
    assert rc.zrange(timers, 0, -1, withscores=True) == [(b"s2", float(now + 500))]
    rc.delete(timers)


# --- many linked streams: bounded webhook bodies ------------------------------------

MAX_PAYLOAD = 256 * 1024  # DSGW_WEBHOOK_MAX_PAYLOAD_BYTES' default


def each(calls: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Run the requests on 16 threads (one client each); their responses, in order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def run(call: Callable[[httpx.Client], httpx.Response]) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        return call(local.client)

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(run, calls))


class AckingReceiver(Receiver):
    """Records every webhook body (raw size, listed streams) and acks what it
    lists: by callback (answering {} first), or by answering {"done": true}.
    While `open` is clear it answers 503 (the wake stays in flight, retried)."""

    def __init__(self, gw: GatewayProcess, sub: str, by_callback: bool) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler

        self.sizes: list[int] = []
        self.listed: set[str] = set()
        self.truncated = 0
        self.open = threading.Event()
        self.open.set()
        receiver = self

        def call_back(delivery: dict[str, Any]) -> None:
            acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in delivery["streams"]]
            with httpx.Client(timeout=30) as client:
                client.post(
                    url(gw, f"__ds/subscriptions/{sub}/callback"),
                    headers={"authorization": f"Bearer {delivery['callback_token']}"},
                    json={"wake_id": delivery["wake_id"], "generation": delivery["generation"],
                          "acks": acks, "done": True},
                )  # fmt: skip

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers["content-length"]))
                if not receiver.open.is_set():
                    respond(self, 503, b"")
                    return
                delivery = json.loads(raw)
                receiver.sizes.append(len(raw))
                receiver.listed.update(s["path"] for s in delivery["streams"])
                receiver.truncated += bool(delivery.get("has_more"))
                assert all(s["has_pending"] for s in delivery["streams"])
                respond(self, 200, b"{}" if by_callback else b'{"done": true}')
                if by_callback:
                    threading.Thread(target=call_back, args=(delivery,), daemon=True).start()

            def log_message(self, *args: Any) -> None:
                pass

        self.server, self.url = serve_on_loopback(Handler)


def many_streams(gw: GatewayProcess, http: httpx.Client, n: int) -> tuple[str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    paths = [f"many-{tag}/stream-{i:05d}" for i in range(n)]
    headers = {"content-type": "application/json"}
    created = each([lambda c, p=p: c.put(url(gw, p), content=b"", headers=headers) for p in paths])
    assert {r.status_code for r in created} == {201}
    return tag, paths


def append_all(gw: GatewayProcess, paths: list[str]) -> dict[str, str]:
    """Append one message to each stream; their new tails."""
    done = each([lambda c, p=p: c.post(url(gw, p), json={"p": p}) for p in paths])
    assert {r.status_code for r in done} == {204}
    return {p: r.headers["stream-next-offset"] for p, r in zip(paths, done, strict=True)}


def acked_offsets(gw: GatewayProcess, http: httpx.Client, sub: str) -> dict[str, str]:
    """Every linked stream's acked offset, page by page (streams_cursor) past 1,000 links."""
    got: dict[str, str] = {}
    params: dict[str, str] = {}
    for _ in range(1000):
        page = http.get(url(gw, f"__ds/subscriptions/{sub}"), params=params).json()
        got.update((s["path"], s["acked_offset"]) for s in page["streams"])
        if "streams_cursor" not in page:
            return got
        params = {"streams_cursor": page["streams_cursor"]}
    raise AssertionError("streams_cursor never ended")


def wait_acked(gw: GatewayProcess, http: httpx.Client, sub: str, tails: dict[str, str]) -> None:
    def acked() -> bool:
        got = acked_offsets(gw, http, sub)
        return all(got.get(p) == t for p, t in tails.items())

    wait_for(acked, timeout_s=120)


@pytest.mark.parametrize("by_callback", [True, False], ids=["callbacks", "done-answers"])
def test_a_webhook_over_3000_streams_lists_pending_ones_in_bodies_within_the_limit(pair, http, by_callback):
    a, b = pair
    tag, paths = many_streams(a, http, 3000)
    sub = f"many-{tag}"
    receiver = AckingReceiver(b, sub, by_callback)
    try:
        body = {"type": "webhook", "pattern": f"many-{tag}/*", "webhook": {"url": receiver.url}}
        created = http.put(url(a, f"__ds/subscriptions/{sub}"), json=body)
        assert created.status_code == 201
        # All 3,000 linked at their tails; the answer is a page of about 1,000, and says so.
        assert created.json()["streams_total"] == 3000 and 1000 <= len(created.json()["streams"]) < 3000
        assert set(acked_offsets(a, http, sub)) == set(paths)
        # A few streams with appends: the bodies list just those.
        few = append_all(a, paths[100:3000:700])
        wait_acked(a, http, sub, few)
        assert receiver.listed == set(few) and receiver.truncated == 0
        assert max(receiver.sizes) < 10_000
        # Every stream with appends (while the first wake is held back, so the
        # next one finds them all pending): more than one body holds, each
        # within the limit; every stream is listed, so acked through what it was sent.
        receiver.listed.clear()
        receiver.open.clear()
        tails = append_all(b, paths)
        receiver.open.set()
        wait_acked(a, http, sub, tails)
        assert receiver.listed == set(paths)
        assert receiver.truncated >= 1 and max(receiver.sizes) <= MAX_PAYLOAD
        assert http.get(url(a, f"__ds/subscriptions/{sub}")).json()["status"] == "active"
    finally:
        http.delete(url(a, f"__ds/subscriptions/{sub}"))
        receiver.close()


def test_a_linked_stream_resharded_from_16_to_64_shards_still_wakes_its_subscription(tmp_path, http):
    """`dsgw reshard` moves a stream's `:subs` link set with its other keys and
    re-files the shard wake queues: after 16 -> 64 an append still wakes the
    subscription, and a wake queued under the old layout is dispatched."""
    from tests.conftest import ROOT

    server = start_redis(tmp_path / "redis", persistent=False)
    rc = redis.Redis.from_url(server.url)
    tag = uuid.uuid4().hex[:8]
    sub, wake, stream, queued = f"rs-{tag}", f"wake-{tag}", f"rs-{tag}/linked", f"rs-{tag}/queued"
    json_type = {"content-type": "application/json"}
    gw = start_gateway(server.url, tmp_path, **dict(ENV, DSGW_SHARDS="16", DSGW_SINK_STREAMS="-"))
    try:
        for path in (wake, stream, queued):
            assert http.put(url(gw, path), content=b"[]", headers=json_type).status_code == 201
        body = {"type": "pull-wake", "streams": [stream, queued], "wake_stream": wake}
        assert http.put(url(gw, f"__ds/subscriptions/{sub}"), json=body).status_code == 201
    finally:
        gw.stop()
    try:
        old_queue = keys.stream_keys_in(queued, 16).wakes
        # As if the gateway had stopped right after an append, before dispatching it.
        rc.zadd(old_queue, {queued: int(time.time() * 1000)})
        moved = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "reshard", "--to", "64"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REDIS_URL": server.url},
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        for path in (stream, queued):
            assert rc.smembers(keys.stream_keys_in(path, 64).subs) == {sub.encode()}
            assert not rc.exists(keys.stream_keys_in(path, 16).subs)
        new_queue = keys.stream_keys_in(queued, 64).wakes
        assert rc.zscore(new_queue, queued) is not None and rc.zscore(old_queue, queued) is None

        gw = start_gateway(server.url, tmp_path, **dict(ENV, DSGW_SHARDS="64", DSGW_SINK_STREAMS="-"))
        try:
            wait_for(lambda: rc.zscore(new_queue, queued) is None)  # the moved entry was dispatched
            assert http.post(url(gw, stream), json={"after": "reshard"}).status_code == 204
            events = wait_for(lambda: wake_events(gw, http, wake, sub))
            assert events[0]["stream"] == stream
            claimed = claim(gw, http, sub, "w").json()
            assert [s["path"] for s in claimed["streams"] if s["has_pending"]] == [stream]
        finally:
            gw.stop()
    finally:
        rc.close()
        server.stop()
