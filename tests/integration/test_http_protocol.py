"""The protocol over real HTTP against a real redis-server, for what the
official suite does not pin down: our Redis layout, bad input, big numbers."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from gateway.keys import stream_keys
from gateway.offsets import entry_id_to_offset

JSON = {"content-type": "application/json"}


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def test_json_messages_are_readable_entries_and_offsets_are_entry_ids(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    assert http.put(url, headers=JSON, content=b'[{"a":1}, {"b":[2,3]}]').status_code == 201
    appended = http.post(url, headers=JSON, content=b'{"c":"x"}')
    assert appended.status_code == 204

    entries = r.xrange(stream_keys(unique).data)
    assert [json.loads(fields[b"json"]) for _, fields in entries] == [{"a": 1}, {"b": [2, 3]}, {"c": "x"}]
    # Every message of an append but the last says how many follow.
    assert [fields.get(b"more") for _, fields in entries] == [b"1", None, None]
    assert appended.headers["stream-next-offset"] == entry_id_to_offset(entries[-1][0])

    # Resuming from any message's offset (as a Postgres row would carry) skips exactly it.
    first_offset = entry_id_to_offset(entries[0][0])
    rest = http.get(url, params={"offset": first_offset})
    assert rest.json() == [{"b": [2, 3]}, {"c": "x"}]


def test_json_appends_are_recorded_in_the_shard_feed_with_their_entry_ids(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    http.put(url, headers=JSON, content=b'[{"a":1}]')
    http.post(url, headers=JSON, content=b'[{"b":2}, {"c":[3]}]')
    http.put(gateway.stream_url(unique + "-bytes"), headers={"content-type": "text/plain"}, content=b"x")
    keys = stream_keys(unique)
    feed = [f for _, f in r.xrange(keys.feed) if f[b"stream"] == unique.encode()]
    data_ids = [i for i, _ in r.xrange(keys.data)]
    assert [f[b"ids"].split() for f in feed] == [data_ids[:1], data_ids[1:]]
    assert [json.loads(f[b"json"]) for f in feed] == [[{"a": 1}], [{"b": 2}, {"c": [3]}]]
    assert not any(
        f[b"stream"] == (unique + "-bytes").encode() for _, f in r.xrange(stream_keys(unique + "-bytes").feed)
    )


def test_names_with_braces_keep_all_keys_in_one_cluster_slot(gateway, http, unique, r):
    from redis.crc import key_slot

    name = f"}}{unique}{{x}}/y"
    keys = stream_keys(name)
    assert len({key_slot(k.encode()) for k in [*keys.all, keys.channel]}) == 1
    url = gateway.url + "/v1/stream/" + httpx.URL(name).raw_path.decode().lstrip("/")
    assert http.put(url, headers={"content-type": "text/plain"}, content=b"hi").status_code == 201
    assert r.xlen(keys.data) == 1
    assert http.get(url).content == b"hi"


def test_json_numbers_and_text_are_kept_as_sent(gateway, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers=JSON)
    body = b'[123456789012345678901234567890, 1.10, "\\u00e9"]'
    assert http.post(url, headers=JSON, content=body).status_code == 204
    assert http.get(url).content == b'[123456789012345678901234567890,1.10,"\\u00e9"]'


def test_producer_numbers_near_2_pow_53_survive_lua(gateway, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "text/plain"})
    big = 2**53 - 2
    headers = {"content-type": "text/plain", "producer-id": "p", "producer-epoch": str(big)}
    first = http.post(url, headers={**headers, "producer-seq": "0"}, content=b"a")
    assert first.status_code == 200 and first.headers["producer-epoch"] == str(big)
    # Walk the seq up to 2^53-1 through the stored state (exponent form would break this).
    r = http.post(url, headers={**headers, "producer-seq": "1"}, content=b"b")
    assert r.status_code == 200
    dup = http.post(url, headers={**headers, "producer-seq": "1"}, content=b"b")
    assert dup.status_code == 204 and dup.headers["producer-seq"] == "1"
    stale = http.post(
        url, headers={**headers, "producer-epoch": str(big - 1), "producer-seq": "0"}, content=b"c"
    )
    assert stale.status_code == 403 and stale.headers["producer-epoch"] == str(big)


def test_far_future_expiry_is_kept_exactly(gateway, http, unique):
    url = gateway.stream_url(unique)
    created = http.put(
        url, headers={"content-type": "text/plain", "stream-expires-at": "9999-12-31T23:59:59.999Z"}
    )
    assert created.status_code == 201
    head = http.head(url)
    assert head.status_code == 200 and head.headers["stream-expires-at"] == "9999-12-31T23:59:59.999Z"


def test_ttl_streams_get_a_redis_expiry_for_garbage_collection(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "text/plain", "stream-ttl": "100"}, content=b"x")
    keys = stream_keys(unique)
    assert 100_000 < r.pttl(keys.meta) <= 160_000
    assert 100_000 < r.pttl(keys.data) <= 160_000
    plain = gateway.stream_url(unique + "-plain")
    http.put(plain, headers={"content-type": "text/plain"}, content=b"x")
    assert r.pttl(stream_keys(unique + "-plain").meta) == -1


BAD_REQUESTS = [
    # (method, headers, body, query, status)
    ("PUT", {"stream-ttl": "1e3"}, b"", {}, 400),
    ("PUT", {"stream-ttl": "60", "stream-expires-at": "2099-01-01T00:00:00Z"}, b"", {}, 400),
    ("PUT", {"stream-expires-at": "tomorrow"}, b"", {}, 400),
    ("PUT", {"content-type": "not a type"}, b"", {}, 400),
    ("PUT", {"stream-fork-sub-offset": "1"}, b"", {}, 400),
    ("PUT", {"stream-forked-from": "elsewhere"}, b"", {}, 400),
    ("PUT", {"stream-forked-from": "/v1/stream/x", "stream-fork-offset": "abc"}, b"", {}, 400),
    ("POST", {"content-type": "application/json"}, b"", {}, 400),
    ("POST", {}, b"data", {}, 400),
    ("POST", {"content-type": "application/json"}, b"[1, 2,]", {}, 400),
    ("POST", {"content-type": "application/json"}, b"[NaN]", {}, 400),
    ("POST", {"content-type": "application/json"}, b"[]", {}, 400),
    ("POST", {"content-type": "application/json"}, b"\xff\xfe", {}, 400),
    ("POST", {"content-type": "application/json", "producer-id": "p"}, b"1", {}, 400),
    (
        "POST",
        {
            "content-type": "application/json",
            "producer-id": "p",
            "producer-epoch": "0",
            "producer-seq": "1e3",
        },
        b"1",
        {},
        400,
    ),
    (
        "POST",
        {
            "content-type": "application/json",
            "producer-id": "p",
            "producer-epoch": str(2**53),
            "producer-seq": "0",
        },
        b"1",
        {},
        400,
    ),
    ("POST", {"content-type": "application/json", "stream-seq": ""}, b"1", {}, 400),
    ("GET", {}, b"", {"offset": ""}, 400),
    ("GET", {}, b"", {"offset": "0_0/x"}, 400),
    ("GET", {}, b"", {"offset": "99999999999999999999999_0"}, 400),
    ("GET", {}, b"", {"live": "long-poll"}, 400),
    ("GET", {}, b"", {"offset": "-1", "live": "forever"}, 400),
    ("PATCH", {}, b"", {}, 405),
]


@pytest.mark.parametrize(("method", "headers", "body", "query", "status"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_problem_and_writes_nothing(
    gateway, http, unique, method, headers, body, query, status
):
    url = gateway.stream_url(unique)
    if method != "PUT":
        http.put(url, headers=JSON, content=b'[{"before":true}]')
    before = http.get(url).content if method != "PUT" else None
    response = http.request(method, url, headers=headers, content=body, params=query)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"]
    if method == "PUT":
        assert http.head(url).status_code == 404
    else:
        assert http.get(url).content == before


def test_body_over_the_limit_is_413(gateway, http, unique):
    url = gateway.stream_url(unique)
    http.put(url, headers={"content-type": "application/octet-stream"})
    response = http.post(
        url, headers={"content-type": "application/octet-stream"}, content=b"x" * (8 * 1024 * 1024 + 1)
    )
    assert response.status_code == 413
    assert http.get(url).content == b""


def test_reserved_root_is_not_a_stream(gateway, http):
    # __ds/... is the subscription API (gateway/subscriptions/api.py), never a stream.
    response = http.put(gateway.url + "/v1/stream/__ds/subscriptions/x")
    assert (response.status_code, response.json()["error"]["code"]) == (400, "INVALID_REQUEST")
    response = http.put(gateway.url + "/v1/stream/__ds/x", headers={"content-type": "text/plain"})
    assert response.status_code == 404


def test_invalid_element_in_a_json_batch_writes_nothing(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    http.put(url, headers=JSON, content=b"[1]")
    response = http.post(url, headers=JSON, content=b'[2, 3, {"bad": }]')
    assert response.status_code == 400
    assert r.xlen(stream_keys(unique).data) == 1


def test_fork_soft_delete_keeps_source_data_until_the_last_fork_goes(gateway, http, unique, r):
    source, fork = gateway.stream_url(unique), gateway.stream_url(unique + "-fork")
    http.put(source, headers=JSON, content=b'[{"n":1},{"n":2}]')
    created = http.put(fork, headers={"stream-forked-from": f"/v1/stream/{unique}"})
    assert created.status_code == 201 and created.headers["content-type"] == "application/json"
    assert http.post(fork, headers=JSON, content=b'{"n":3}').status_code == 204
    assert http.delete(source).status_code == 204
    assert http.get(source).status_code == 410
    assert http.get(fork).json() == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert r.exists(stream_keys(unique).data) == 1
    assert http.delete(fork).status_code == 204
    assert http.head(source).status_code == 404
    assert r.exists(*stream_keys(unique).own, *stream_keys(unique + "-fork").own) == 0


def test_security_and_cors_headers_on_errors_too(gateway, http, unique):
    response = http.get(gateway.stream_url(unique))
    assert response.status_code == 404
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = http.options(gateway.stream_url(unique))
    assert preflight.status_code == 204
    assert "if-none-match" in preflight.headers["access-control-allow-headers"]


def test_health_and_metrics(gateway, http):
    assert http.get(gateway.url + "/healthz").json()["status"] == "ok"
    ready = http.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["subscription"] is True
    metrics = http.get(gateway.url + "/metrics").text
    assert "dsgw_responses_total" in metrics


def test_a_recreated_stream_never_repeats_an_offset_of_the_removed_one(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    keys = stream_keys(unique)
    http.put(url, headers=JSON, content=b"[1]")
    # Pretend the old stream's last entry is far ahead of the clock (clock
    # skew, or simply the same millisecond as the re-created stream's first).
    r.xadd(keys.data, {"json": "2"}, id="9999999999999-5")
    r.hset(keys.meta, "tail", "9999999999999-5")
    assert http.delete(url).status_code == 204
    assert http.put(url, headers=JSON).headers["stream-next-offset"] == "0000000000000000_0000000000000000"
    appended = http.post(url, headers=JSON, content=b"[3]")
    assert appended.headers["stream-next-offset"] > "0009999999999999_0000000000000005"
    assert http.get(url).json() == [3]


def test_recreating_an_expired_fork_keeps_its_reference_on_the_source(gateway, http, unique):
    import time

    source, fork = gateway.stream_url(unique), gateway.stream_url(unique + "-f")
    fork_headers = {"stream-forked-from": f"/v1/stream/{unique}", "stream-ttl": "1"}
    http.put(source, headers=JSON, content=b'[{"n":1}]')
    assert http.put(fork, headers=fork_headers).status_code == 201
    time.sleep(1.2)
    assert http.put(fork, headers=fork_headers).status_code == 201  # the expired one is replaced
    assert http.delete(source).status_code == 204
    assert http.get(source).status_code == 410  # soft-deleted: the new fork still reads it
    assert http.get(fork).json() == [{"n": 1}]


def test_a_fork_that_vanished_without_release_does_not_pin_its_source(gateway, http, unique, r):
    source, fork = gateway.stream_url(unique), gateway.stream_url(unique + "-f")
    http.put(source, headers=JSON, content=b"[1]")
    http.put(fork, headers={"stream-forked-from": f"/v1/stream/{unique}"})
    r.delete(*stream_keys(unique + "-f").own)  # as if its gateway died before releasing
    assert http.delete(source).status_code == 204
    assert http.head(source).status_code == 404
    assert http.put(source, headers=JSON).status_code == 201


def test_unicode_names_get_a_percent_encoded_location(gateway, http, unique):
    name = f"{unique}/日本"
    created = http.put(gateway.url + "/v1/stream/" + name, headers=JSON)
    assert created.status_code == 201
    assert created.headers["location"].endswith("/v1/stream/" + unique + "/%E6%97%A5%E6%9C%AC")
    assert http.get(created.headers["location"]).status_code == 200


def test_too_many_messages_in_one_append_is_413_and_writes_nothing(gateway, http, unique, r):
    url = gateway.stream_url(unique)
    http.put(url, headers=JSON)
    response = http.post(url, headers=JSON, content=b"[" + b",".join([b"0"] * 10_001) + b"]")
    assert response.status_code == 413
    assert r.xlen(stream_keys(unique).data) == 0
    assert http.post(url, headers=JSON, content=b"[" + b",".join([b"0"] * 10_000) + b"]").status_code == 204


def _raw_exchange(port: int, request: bytes, read_after_s: float) -> tuple[bytes, bytes, bool]:
    """Send `request` whole, wait, then read to EOF: (head, body, whether the
    connection was reset). The wait lets the server finish and close first,
    as a slow reader would."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        time.sleep(read_after_s)
        received = bytearray()
        reset = False
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            reset = True  # what a close over unread request bytes does: the tail is lost
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body, reset


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_a_body_on_a_request_that_takes_none_does_not_cut_the_answer_short(gateway, http, unique, method):
    """A request body the route does not read is read and dropped before the
    answer: closing a socket with unread input makes the kernel reset it, and
    the client loses whatever of the answer it has not received yet."""
    url = f"{gateway.url}/v1/stream/{unique}"
    assert http.put(url, headers={"content-type": "application/octet-stream"}).status_code == 201
    big = b"x" * (300 * 1024)  # more than the client's receive buffer takes before it reads
    assert (
        http.post(url, headers={"content-type": "application/octet-stream"}, content=big).status_code == 204
    )
    unread = b"y" * (440 * 1024)
    path = f"/v1/stream/{unique}?offset=-1" if method == "GET" else f"/v1/stream/{unique}"
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(unread)}\r\n\r\n"
    ).encode() + unread
    head, body, reset = _raw_exchange(gateway.port, request, read_after_s=0.3)
    assert not reset
    status = int(head.split(b" ", 2)[1])
    if method == "GET":
        assert status == 200
        assert body == big
    else:
        assert status == (200 if method == "HEAD" else 204)
        assert body == b""
    if method != "DELETE":
        assert http.head(url).status_code == 200


def test_a_body_on_a_control_api_read_is_dropped_too(gateway):
    """The __ds routes (here the JWKS document) read and drop it as well: the
    connection ends with a close, not a reset."""
    unread = b"y" * (440 * 1024)
    request = (
        "GET /v1/stream/__ds/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Length: {len(unread)}\r\n\r\n"
    ).encode() + unread
    head, body, reset = _raw_exchange(gateway.port, request, read_after_s=0.3)
    assert not reset
    assert int(head.split(b" ", 2)[1]) == 200
    assert json.loads(body)["keys"]


def test_a_body_past_the_limit_on_a_read_is_413(gateway, http, unique):
    """The dropped body is bounded like a kept one: declared past
    DSGW_MAX_BODY_BYTES (8 MiB by default), it is refused before any is read."""
    url = f"{gateway.url}/v1/stream/{unique}"
    assert http.put(url, headers={"content-type": "application/octet-stream"}).status_code == 201
    request = (
        f"GET /v1/stream/{unique}?offset=-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Length: {8 * 1024 * 1024 + 1}\r\n\r\n"
    ).encode()
    head, body, _ = _raw_exchange(gateway.port, request, read_after_s=0)
    assert int(head.split(b" ", 2)[1]) == 413
    assert json.loads(body)["title"] == "Body too large"
