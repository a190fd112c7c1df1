"""The OpenAPI document (gateway/openapi.py) against a real gateway: every path
and method the gateway serves is in it, and Schemathesis checks real responses
(status codes, headers, content types, JSON bodies) against it, bounded and
derandomized so that a run takes seconds and is the same every time."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from gateway.app import create_app
from gateway.openapi import OPENAPI_PATH, RESERVED_PATH, STREAM_PATH, build_document
from gateway.routes import ALLOW
from gateway.settings import Settings
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
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def api_gateway(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Live reads end quickly here: the checker reads whole responses."""
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-openapi"),
        DSGW_LONG_POLL_TIMEOUT_MS="200",
        DSGW_SSE_MAX_LIFETIME_MS="300",
    )
    yield gw
    gw.stop()


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
    # Nothing described that is not served (the stream and reserved paths are the lean handlers).
    described_elsewhere = {(p, m) for p, m in described if p not in (STREAM_PATH, RESERVED_PATH)}
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


def test_real_responses_conform_to_the_document(api_gateway: GatewayProcess, http: httpx.Client) -> None:
    schema = schemathesis.openapi.from_url(api_gateway.url + OPENAPI_PATH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:
        reset_existing(http, api_gateway.url)
        existing = st.sampled_from([None, *EXISTING])

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), name=existing)
        def check(case, name):  # type: ignore[no-untyped-def]
            if name is not None and "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = name
            # The HTTP client folds `.` and `..` path segments before sending
            # (RFC 3986), so such a request would go to another URL.
            for value in (case.path_parameters or {}).values():
                assume(not any(seg in (".", "..") for seg in str(value).split("/")))
            case.call_and_validate(base_url=api_gateway.url, checks=CHECKS, timeout=10)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report all
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


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
