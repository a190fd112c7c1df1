"""The OpenAPI document (gateway/openapi.py) against a real gateway: every path
and method the gateway serves is in it, and Schemathesis checks real responses
(status codes, headers, content types, JSON bodies) against it, bounded and
derandomized so that a run takes seconds and is the same every time."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from gateway.app import create_app
from gateway.openapi import (
    DS_PREFIX,
    JWKS_PATH,
    OPENAPI_PATH,
    PROBLEM,
    RESERVED_PATH,
    STREAM_PATH,
    SUB_PATH,
    build_document,
)
from gateway.routes import ALLOW, STREAM_PREFIX
from gateway.settings import Settings
from gateway.subscriptions.api import ACTIONS
from tests.conftest import GatewayProcess, start_gateway

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Streams that generated requests are pointed at half the time, so that
# successful reads, appends and deletes are checked too, not only 404s.
EXISTING = {
    "chat/room-1": ("application/json", b'[{"type":"message","text":"hi"},{"n":2}]'),
    "openapi/text": ("text/plain", b"hello"),
    "openapi/bytes": ("application/octet-stream", b"\x00\x01\x02"),
}
# A pull-wake subscription that generated requests are pointed at half the
# time, so that GET, claim and the others answer more than 404.
SUBSCRIPTION = "openapi-sub"
SUBSCRIPTION_CONFIG = {"type": "pull-wake", "streams": ["chat/room-1"], "wake_stream": "openapi/wakes"}
EXAMPLES_PER_OPERATION = 25
# The reserved catch-all only ever answers 404: a few examples of each method do.
RESERVED_EXAMPLES = 5


@pytest.fixture(scope="module")
def api_gateway(module_redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Live reads end quickly here: the checker reads whole responses. Its own
    Redis: the session's gateways would take its webhook deliveries and refuse
    the test's loopback receiver."""
    gw = start_gateway(
        module_redis.url,
        tmp_path_factory.mktemp("gw-openapi"),
        DSGW_LONG_POLL_TIMEOUT_MS="200",
        DSGW_SSE_MAX_LIFETIME_MS="300",
        DSGW_WEBHOOK_ALLOW_PRIVATE="loopback",  # the webhook receiver of a test is on 127.0.0.1
    )
    before = subscription_ids(module_redis.url)
    yield gw
    # Generated requests create subscriptions (some with broad patterns): every
    # one of them must still be deletable through the API.
    with httpx.Client(timeout=10) as client:
        for sub_id in subscription_ids(module_redis.url) - before:
            client.delete(f"{gw.url}/v1/stream/__ds/subscriptions/{quote(sub_id, safe='')}")
    left = subscription_ids(module_redis.url) - before
    gw.stop()
    assert not left, f"subscriptions left behind: {sorted(left)[:5]}"


def subscription_ids(redis_url: str) -> set[str]:
    import redis

    from gateway.keys import SUBSCRIPTIONS

    with redis.Redis.from_url(redis_url) as r:
        return {m.decode() for m in r.smembers(SUBSCRIPTIONS)}


def served_routes(settings: Settings) -> set[tuple[str, str]]:
    """(path, method) of every route outside the stream handlers, from the app itself."""
    edge = create_app(settings)
    found = set()
    for route in edge.app.router.routes:
        if isinstance(route, Route) and route.methods:
            path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
            # Starlette adds HEAD to every GET route; the document says so once.
            found |= {(path, m.lower()) for m in route.methods if m != "HEAD"}
    return found


@pytest.mark.parametrize("console", [True, False])
def test_every_served_path_and_method_is_described(console: bool) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1", console=console)
    paths = build_document(settings)["paths"]
    described = {(path, method) for path, ops in paths.items() for method in ops}
    routes = served_routes(settings)
    assert routes, "no routes found in the app"
    assert routes <= described, f"served but not described: {sorted(routes - described)}"
    # The stream handlers (gateway/routes.py) take exactly the methods they announce in Allow.
    assert set(paths[STREAM_PATH]) == {m.strip().lower() for m in ALLOW.split(",")}
    # Every subscription route (gateway/subscriptions/api.py) has its own path.
    assert {SUB_PATH, SUB_PATH + "/streams", SUB_PATH + "/streams/{path}"} <= set(paths)
    assert {SUB_PATH + "/" + action for action in ACTIONS} <= set(paths)
    # Nothing described that is not served (paths under /v1/stream/ are the lean handlers).
    described_elsewhere = {(p, m) for p, m in described if not p.startswith(STREAM_PREFIX)}
    assert described_elsewhere == routes
    assert any(p.startswith("/console") for p, _ in routes) == console


def test_served_document_is_openapi_3_1(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    response = http.get(api_gateway.url + OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document == build_document(Settings())
    # Loading it resolves every $ref and validates it as OpenAPI.
    schema = schemathesis.openapi.from_dict(document)
    assert len([op for op in schema.get_all_operations() if op.ok()]) >= 15


def reset_existing(http: httpx.Client, base: str) -> None:
    for name, (content_type, body) in EXISTING.items():
        http.delete(f"{base}/v1/stream/{name}")
        response = http.put(f"{base}/v1/stream/{name}", headers={"content-type": content_type}, content=body)
        assert response.status_code == 201, response.text
    sub = f"{base}/v1/stream/__ds/subscriptions/{SUBSCRIPTION}"
    assert http.delete(sub).status_code == 204
    response = http.put(sub, json=SUBSCRIPTION_CONFIG)
    assert response.status_code == 201, response.text


def describe(operation: str, exc: BaseException) -> str:
    """One failing operation: Schemathesis's report (every distinct failure,
    the response, a curl command) and Hypothesis's falsifying example."""
    return "\n".join([f"{operation}: {type(exc).__name__}", str(exc), *getattr(exc, "__notes__", [])])


def nonconforming(operations: list, base: str, http: httpx.Client, examples: int) -> list[str]:  # type: ignore[type-arg]
    """Schemathesis's checks on real responses to each operation; a report per
    operation that failed (all of them: one failing does not stop the others)."""
    failures: list[str] = []
    for operation in operations:
        reset_existing(http, base)

        @settings(
            max_examples=min(examples, RESERVED_EXAMPLES) if operation.path == RESERVED_PATH else examples,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=operation.as_strategy(),
            name=st.sampled_from([None, *EXISTING]),
            sub=st.sampled_from([None, SUBSCRIPTION]),
        )
        def check(case, name, sub):  # type: ignore[no-untyped-def]
            params = case.path_parameters or {}
            if name is not None:
                if "name" in params:
                    params["name"] = name
                if case.operation.path.endswith("/streams/{path}"):  # a stream's path, not __ds/{path}
                    params["path"] = name
            if sub is not None and "id" in params:
                params["id"] = sub
            # The HTTP client folds `.` and `..` path segments before sending
            # (RFC 3986), so such a request would go to another URL.
            for value in params.values():
                assume(not any(seg in (".", "..") for seg in str(value).split("/")))
            case.call_and_validate(base_url=base, checks=CHECKS, timeout=10)

        try:
            check()
        # Schemathesis raises its check failures as a FailureGroup (even a single
        # one), a BaseExceptionGroup that `except Exception` does not catch.
        except (Exception, FailureGroup) as exc:
            failures.append(describe(operation.label, exc))
    return failures


def test_real_responses_conform_to_the_document(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    schema = schemathesis.openapi.from_url(api_gateway.url + OPENAPI_PATH)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every __ds operation is among them (they come before the generic stream path).
    labels = {op.label.split(" ", 1)[1] for op in operations}
    assert {p for p in build_document(Settings())["paths"] if p.startswith(DS_PREFIX)} <= labels
    failures = nonconforming(operations, api_gateway.url, http, EXAMPLES_PER_OPERATION)
    assert not failures, f"{len(failures)} of {len(operations)} operations failed:\n\n" + "\n\n".join(
        failures
    )


def test_every_nonconforming_operation_is_reported(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    """Two operations the document gets wrong, between two it gets right: both
    wrong ones are reported, with Schemathesis's report of each."""
    document = copy.deepcopy(build_document(Settings()))
    jwks_ok = document["paths"][JWKS_PATH]["get"]["responses"]["200"]
    jwks_ok["content"] = {"application/json": jwks_ok["content"]["application/jwk-set+json"]}
    document["paths"][SUB_PATH]["get"]["responses"]["404"]["content"] = PROBLEM
    wanted = [
        f"GET {JWKS_PATH}",
        "GET /healthz",
        f"GET {SUB_PATH}",
        f"DELETE {SUB_PATH}",
    ]
    by_label = {
        op.label: op for op in (r.ok() for r in schemathesis.openapi.from_dict(document).get_all_operations())
    }
    failures = nonconforming([by_label[label] for label in wanted], api_gateway.url, http, 5)
    assert [f.split(":", 1)[0] for f in failures] == [f"GET {JWKS_PATH}", f"GET {SUB_PATH}"]
    assert "application/jwk-set+json" in failures[0]
    assert "application/problem+json" in failures[1]


def test_sse_events_conform(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    """An SSE body, data and control events, checked event by event against the
    document (generated requests reach a complete SSE body only sometimes)."""
    reset_existing(http, api_gateway.url)
    operation = schemathesis.openapi.from_dict(build_document(Settings()))[STREAM_PATH]["GET"]
    for name in EXISTING:
        sse = http.get(f"{api_gateway.url}/v1/stream/{name}", params={"offset": "-1", "live": "sse"})
        assert sse.status_code == 200 and "event: data" in sse.text and "event: control" in sse.text
        operation.validate_response(sse)


def test_pull_wake_round_trip_conforms(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    """The answers generated requests rarely reach (a claim that succeeds, acks
    and a release under its token, FENCED, ALREADY_CLAIMED, INVALID_OFFSET,
    SUBSCRIPTION_ALREADY_EXISTS), each checked against the document."""
    schema = schemathesis.openapi.from_dict(build_document(Settings()))
    base = api_gateway.url + "/v1/stream"
    sub_url = f"{base}/__ds/subscriptions/openapi-flow"

    def checked(
        path: str, method: str, response: httpx.Response, status: int, code: str | None = None
    ) -> Any:
        assert response.status_code == status, response.text
        schema[path][method].validate_response(response)
        if code is not None:
            assert response.json()["error"]["code"] == code
        return response.json() if response.content else None

    for name in ("openapi/work", "openapi/flow-wakes"):
        http.delete(f"{base}/{name}")
        assert http.put(f"{base}/{name}", headers={"content-type": "application/json"}).status_code == 201
    http.delete(sub_url)
    config = {"type": "pull-wake", "streams": ["openapi/work"], "wake_stream": "openapi/flow-wakes"}
    checked(SUB_PATH, "PUT", http.put(sub_url, json=config), 201)
    checked(SUB_PATH, "PUT", http.put(sub_url, json=config), 200)
    other = http.put(sub_url, json={**config, "lease_ttl_ms": 5000})
    checked(SUB_PATH, "PUT", other, 409, "SUBSCRIPTION_ALREADY_EXISTS")
    idle = http.post(f"{sub_url}/claim", json={"worker": "w1"})
    checked(f"{SUB_PATH}/claim", "POST", idle, 409, "NO_PENDING_WORK")  # nothing appended yet
    appended = http.post(f"{base}/openapi/work", headers={"content-type": "application/json"}, content=b"{}")
    tail = appended.headers["stream-next-offset"]

    # The append's wake reaches the wake stream asynchronously; claim it then.
    deadline = time.monotonic() + 10
    events: list[Any] = []
    while not events and time.monotonic() < deadline:
        events = http.get(f"{base}/openapi/flow-wakes", params={"offset": "-1"}).json()
        time.sleep(0.05)
    assert events and all(conforms_to("WakeEvent", event) for event in events)
    claim = http.post(f"{sub_url}/claim", json={"worker": "w1"})
    claimed = checked(f"{SUB_PATH}/claim", "POST", claim, 200)
    busy = checked(f"{SUB_PATH}/claim", "POST", http.post(f"{sub_url}/claim", json={"worker": "w2"}), 409)
    assert busy["error"]["code"] == "ALREADY_CLAIMED" and busy["error"]["current_holder"] == "w1"

    bearer = {"authorization": f"Bearer {claimed['token']}"}
    wake = {"generation": claimed["generation"], "wake_id": claimed["wake_id"]}
    beyond = {**wake, "acks": [{"stream": "openapi/work", "offset": "9" * 16 + "_" + "9" * 16}]}
    checked(
        f"{SUB_PATH}/ack",
        "POST",
        http.post(f"{sub_url}/ack", json=beyond, headers=bearer),
        409,
        "INVALID_OFFSET",
    )
    acked = http.post(
        f"{sub_url}/ack", json={**wake, "acks": [{"stream": "openapi/work", "offset": tail}]}, headers=bearer
    )
    assert checked(f"{SUB_PATH}/ack", "POST", acked, 200)["ok"] is True
    checked(f"{SUB_PATH}/release", "POST", http.post(f"{sub_url}/release", json=wake, headers=bearer), 204)
    stale = http.post(f"{sub_url}/release", json=wake, headers=bearer)
    checked(f"{SUB_PATH}/release", "POST", stale, 409, "FENCED")
    forged = http.post(f"{sub_url}/callback", json=wake, headers={"authorization": "Bearer x.y.z"})
    checked(f"{SUB_PATH}/callback", "POST", forged, 401, "TOKEN_INVALID")
    checked(SUB_PATH, "GET", http.get(sub_url), 200)
    checked(SUB_PATH, "DELETE", http.delete(sub_url), 204)


def conforms_to(name: str, value: Any) -> bool:
    """`value` is valid for the document's schema `name` (refs resolved within the document)."""
    from jsonschema import Draft202012Validator

    document = build_document(Settings())
    Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document}).validate(value)
    return True


def test_webhook_wake_conforms(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    """A real webhook delivery is the document's WebhookWake with the Webhook-Signature
    it describes, and the callback it invites answers as the document says."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[dict[str, Any], str]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((json.loads(body), self.headers["webhook-signature"]))
            self.send_response(200)  # accepted, not done: the callback ends the wake
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = api_gateway.url + "/v1/stream"
    sub_url = f"{base}/__ds/subscriptions/openapi-hook"
    schema = schemathesis.openapi.from_dict(build_document(Settings()))
    try:
        http.delete(f"{base}/openapi/hooked")
        assert (
            http.put(f"{base}/openapi/hooked", headers={"content-type": "application/json"}).status_code
            == 201
        )
        http.delete(sub_url)
        hook = {"url": f"http://127.0.0.1:{server.server_port}/hook"}
        created = http.put(sub_url, json={"type": "webhook", "streams": ["openapi/hooked"], "webhook": hook})
        assert created.status_code == 201
        schema[SUB_PATH]["PUT"].validate_response(created)
        assert created.json()["webhook"]["signing"]["alg"] == "ed25519"
        http.post(f"{base}/openapi/hooked", headers={"content-type": "application/json"}, content=b"{}")
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received, "no webhook delivery within 10 s"
        wake, signature = received[0]
        assert conforms_to("WebhookWake", wake)
        assert re.fullmatch(r"t=[0-9]+,kid=[^,]+,ed25519=[A-Za-z0-9_-]+", signature)
        acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in wake["streams"]]
        done = {"generation": wake["generation"], "wake_id": wake["wake_id"], "done": True, "acks": acks}
        answer = http.post(
            wake["callback_url"], json=done, headers={"authorization": f"Bearer {wake['callback_token']}"}
        )
        assert answer.status_code == 200, answer.text
        schema[f"{SUB_PATH}/callback"]["POST"].validate_response(answer)
        assert http.delete(sub_url).status_code == 204
    finally:
        server.shutdown()
        server.server_close()


# --- tiered history (issue 11): Stream-Hot-Offset, Stream-Earliest-Offset, GET's 410 and 503 ----


def _tiered_gateway(redis_server, tmp_path_factory, history_url: str) -> Iterator[GatewayProcess]:  # type: ignore[no-untyped-def]
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-openapi-tier"),
        DSGW_RETAIN_MESSAGES="3",  # the streams it creates are tiered
        DSGW_HISTORY_DATABASE_URL=history_url,
        DSGW_HISTORY_TIMEOUT_MS="1000",
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def no_history_gateway(redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:  # type: ignore[no-untyped-def]
    yield from _tiered_gateway(redis_server, tmp_path_factory, "-")


@pytest.fixture(scope="module")
def dead_history_gateway(redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:  # type: ignore[no-untyped-def]
    from gateway.embedded import free_port

    yield from _tiered_gateway(redis_server, tmp_path_factory, f"postgresql://x@127.0.0.1:{free_port()}/x")


def trimmed_stream(http: httpx.Client, redis_url: str, base: str, name: str) -> str:
    """A tiered JSON stream of 10 messages trimmed to its newest 3, as the
    sink's trim.lua call after a commit does it; its trim point."""
    import redis

    from gateway.keys import stream_keys, trim_due_key
    from gateway.offsets import entry_id_to_offset
    from gateway.scripts import script_source

    url = f"{base}/v1/stream/{name}"
    http.delete(url)
    assert http.put(url, headers={"content-type": "application/json"}).status_code == 201
    for i in range(10):
        assert (
            http.post(url, headers={"content-type": "application/json"}, content=b'{"n":%d}' % i).status_code
            == 204
        )
    keys = stream_keys(name)
    with redis.Redis.from_url(redis_url) as r:
        newest = r.xrevrange(keys.data, count=1)[0][0].decode()
        point, removed = r.eval(script_source("trim"), 3, keys.meta, keys.data, trim_due_key(keys.shard),
                                newest, "3", "", name)  # fmt: skip
    assert removed == 7
    return entry_id_to_offset(point)


def conforms(method: str, response: httpx.Response) -> None:
    """Schemathesis's checks on one real response, and every Stream-* header
    it carries is one the document names for that status."""
    document = build_document(Settings())
    operation = schemathesis.openapi.from_dict(document)[STREAM_PATH][method]
    operation.validate_response(response)
    documented = document["paths"][STREAM_PATH][method.lower()]["responses"][str(response.status_code)]
    names = {h.lower() for h in documented["headers"]}
    sent = {h.lower() for h in response.headers if h.lower().startswith("stream-")}
    assert sent <= names, f"{method} {response.status_code}: undocumented {sorted(sent - names)}"
    if method != "HEAD" and response.status_code >= 400:
        # The problem body is one the document shows (status and title).
        examples = documented["content"]["application/problem+json"]["examples"].values()
        body = response.json()
        assert (body["status"], body["title"]) in {
            (e["value"]["status"], e["value"]["title"]) for e in examples
        }


def read_below_trim(http: httpx.Client, redis_url: str, gw: GatewayProcess, name: str):  # type: ignore[no-untyped-def]
    """GET from -1 and HEAD of a freshly trimmed stream, both checked against
    the document; (trim point, GET response, HEAD response)."""
    point = trimmed_stream(http, redis_url, gw.url, name)
    url = f"{gw.url}/v1/stream/{name}"
    below, head = http.get(url, params={"offset": "-1"}), http.head(url)
    assert head.status_code == 200 and head.headers["stream-hot-offset"] == point
    conforms("GET", below)
    conforms("HEAD", head)
    return point, below, head


def test_trimmed_stream_without_history_410_and_head_headers_conform(
    no_history_gateway: GatewayProcess, redis_server, http: httpx.Client
) -> None:  # type: ignore[no-untyped-def]
    point, gone, head = read_below_trim(http, redis_server.url, no_history_gateway, "openapi/tiered-410")
    assert gone.status_code == 410 and gone.headers["stream-earliest-offset"] == point
    assert gone.json()["status"] == 410
    assert head.headers["stream-earliest-offset"] == point
    hot = http.get(f"{no_history_gateway.url}/v1/stream/openapi/tiered-410", params={"offset": point})
    assert hot.status_code == 200 and hot.json() == [{"n": 7}, {"n": 8}, {"n": 9}]
    conforms("GET", hot)


def test_trimmed_stream_with_history_down_503_conforms(
    dead_history_gateway: GatewayProcess, redis_server, http: httpx.Client
) -> None:  # type: ignore[no-untyped-def]
    _, unavailable, head = read_below_trim(http, redis_server.url, dead_history_gateway, "openapi/tiered-503")
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"
    assert unavailable.json()["title"] == "History unavailable"
    assert "stream-earliest-offset" not in head.headers  # a history database: every offset readable
