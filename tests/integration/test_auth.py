"""Authentication and stream scopes over real HTTP (gateway/auth.py): the
matrix of credentials x operations with exact statuses, refusals that change
nothing, token expiry ending SSE and long-poll, API keys reloaded from their
file, and JWKS keys (RS256, ES256, EdDSA) including rotation to an unknown kid."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth import hash_key
from tests.conftest import GatewayProcess, start_gateway

SECRET = "test-secret-" + "x" * 40
ISSUER = "https://issuer.test"
AUDIENCE = "ds-gateway"
API_KEY = "dsk_" + "k" * 40
ALL = {"read": ["**"], "append": ["**"], "manage": ["**"]}
JSON = {"content-type": "application/json"}


def mint(
    ds: Any = None,
    *,
    ttl: float = 600,
    key: Any = SECRET,
    alg: str = "HS256",
    kid: str | None = None,
    **claims: Any,
) -> str:
    """A token for the test gateway (its issuer and audience) with scopes `ds`."""
    now = time.time()
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "tester",
        "iat": int(now),
        "exp": now + ttl,
    }
    if ds is not None:
        body["ds"] = ds
    body.update(claims)
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Keys:
    """Asymmetric keys published in the gateway's JWKS file."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    @staticmethod
    def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(alg)
        jwk = json.loads(algorithm.to_jwk(private.public_key()))
        return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("auth")
    jwks = base / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [Keys.jwk(keys.rsa, "rsa-1", "RS256"), Keys.jwk(keys.ec, "ec-1", "ES256")]})
    )
    keys_file = base / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": "ci", "sha256": hash_key(API_KEY), "ds": ALL}]}))
    return {"jwks": jwks, "keys": keys_file}


@pytest.fixture(scope="module")
def auth_gateway(
    redis_server: Any, tmp_path_factory: pytest.TempPathFactory, auth_files: dict[str, Path]
) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-auth"),
        DSGW_AUTH_JWT_SECRET=SECRET,
        DSGW_AUTH_ISSUER=ISSUER,
        DSGW_AUTH_AUDIENCE=AUDIENCE,
        DSGW_AUTH_JWKS=str(auth_files["jwks"]),
        DSGW_AUTH_KEYS_FILE=str(auth_files["keys"]),
        # Long enough that a long-poll ending early can only be the token's doing.
        DSGW_LONG_POLL_TIMEOUT_MS="30000",
        DSGW_SSE_KEEPALIVE_MS="500",
    )
    yield gw
    gw.stop()


# --- the matrix ------------------------------------------------------------------------

CREDENTIALS = {
    "no token": None,
    "malformed": "not-a-jwt",
    "bad signature": lambda ds: mint(ds, key="another-secret-" + "y" * 40),
    "expired": lambda ds: mint(ds, ttl=-5),
    "not yet valid": lambda ds: mint(ds, nbf=int(time.time()) + 3600),
    "wrong issuer": lambda ds: mint(ds, iss="https://evil.test"),
    "wrong audience": lambda ds: mint(ds, aud="someone-else"),
    "out of scope": lambda ds: mint({"read": ["other/**"], "append": ["other/**"], "manage": ["other/**"]}),
    "in scope": lambda ds: mint(ds),
}
EXPECTED_401_REASON = {
    "no token": "missing",
    "malformed": "invalid",
    "bad signature": "invalid",
    "expired": "expired",
    "not yet valid": "not yet valid",
    "wrong issuer": "issuer",
    "wrong audience": "audience",
}
# The in-scope status of each operation.
OPERATIONS = {
    "GET": 200,
    "HEAD": 200,
    "SSE": 200,
    "long-poll": 200,
    "POST": 204,
    "PUT": 201,
    "fork": 201,
    "DELETE": 204,
}


def read_all(client: httpx.Client, url: str) -> bytes:
    response = client.get(url, params={"offset": "-1"}, headers=bearer(mint(ALL)))
    return response.content if response.status_code == 200 else b"<%d>" % response.status_code


def perform(client: httpx.Client, gw: GatewayProcess, op: str, base: str, headers: dict[str, str]) -> int:
    """Run `op` on the streams of `base`; the status."""
    url = gw.stream_url(f"{base}/existing")
    if op == "GET":
        return client.get(url, params={"offset": "-1"}, headers=headers).status_code
    if op == "HEAD":
        return client.head(url, headers=headers).status_code
    if op == "SSE":
        with client.stream("GET", url, params={"offset": "-1", "live": "sse"}, headers=headers) as r:
            return r.status_code  # leaving the block closes the connection
    if op == "long-poll":
        return client.get(url, params={"offset": "-1", "live": "long-poll"}, headers=headers).status_code
    if op == "POST":
        return client.post(url, content=b'{"n":2}', headers={**JSON, **headers}).status_code
    if op == "PUT":
        return client.put(gw.stream_url(f"{base}/new"), headers={**JSON, **headers}).status_code
    if op == "fork":
        fork = {"stream-forked-from": f"/v1/stream/{base}/existing"}
        return client.put(gw.stream_url(f"{base}/fork"), headers={**fork, **headers}).status_code
    if op == "DELETE":
        return client.delete(url, headers=headers).status_code
    raise AssertionError(op)


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_matrix(auth_gateway: GatewayProcess, credential: str, op: str) -> None:
    gw = auth_gateway
    base = f"m/{uuid.uuid4().hex[:10]}"
    admin = bearer(mint(ALL))
    with httpx.Client(timeout=10) as client:
        assert client.put(gw.stream_url(f"{base}/existing"), headers={**JSON, **admin}).status_code == 201
        assert (
            client.post(
                gw.stream_url(f"{base}/existing"), content=b'{"n":1}', headers={**JSON, **admin}
            ).status_code
            == 204
        )
        before = read_all(client, gw.stream_url(f"{base}/existing"))

        make = CREDENTIALS[credential]
        scope = {"read": [f"{base}/*"], "append": [f"{base}/*"], "manage": [f"{base}/*"]}
        token = make(scope) if callable(make) else make
        headers = bearer(token) if token else {}
        if op == "HEAD":
            response = client.head(gw.stream_url(f"{base}/existing"), headers=headers)
        status = perform(client, gw, op, base, headers)

        if credential == "in scope":
            assert status == OPERATIONS[op]
            return
        assert status == (403 if credential == "out of scope" else 401)
        # A refusal changes nothing: the stream is as it was, nothing new exists.
        assert read_all(client, gw.stream_url(f"{base}/existing")) == before
        for other in ("new", "fork"):
            assert client.head(gw.stream_url(f"{base}/{other}"), headers=admin).status_code == 404
        if op != "HEAD":
            return
        # HEAD has no body; the challenge is in the headers.
        challenge = response.headers.get("www-authenticate", "")
        assert challenge.startswith("Bearer ")
        if credential == "out of scope":
            assert 'error="insufficient_scope"' in challenge
        else:
            assert EXPECTED_401_REASON[credential] in challenge


@pytest.mark.parametrize("credential", [c for c in CREDENTIALS if c not in ("in scope",)])
def test_problem_body_explains_without_echoing_the_token(
    auth_gateway: GatewayProcess, credential: str
) -> None:
    make = CREDENTIALS[credential]
    token = make({"read": ["x"]}) if callable(make) else make
    response = httpx.get(
        auth_gateway.stream_url("private/x"), params={"offset": "-1"}, headers=bearer(token) if token else {}
    )
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == response.status_code
    if token:
        assert token not in response.text
        for part in token.split("."):
            assert len(part) < 8 or part not in response.text
    if response.status_code == 401:
        assert EXPECTED_401_REASON[credential] in body["detail"]
        assert EXPECTED_401_REASON[credential] in response.headers["www-authenticate"]


def test_fork_needs_read_on_its_source(auth_gateway: GatewayProcess, http: httpx.Client) -> None:
    gw = auth_gateway
    base = f"f/{uuid.uuid4().hex[:10]}"
    admin = bearer(mint(ALL))
    assert http.put(gw.stream_url(f"{base}/src/a"), headers={**JSON, **admin}).status_code == 201
    fork = {"stream-forked-from": f"/v1/stream/{base}/src/a"}
    no_read = bearer(mint({"manage": [f"{base}/forks/*"]}))
    assert http.put(gw.stream_url(f"{base}/forks/a"), headers={**fork, **no_read}).status_code == 403
    assert http.head(gw.stream_url(f"{base}/forks/a"), headers=admin).status_code == 404
    with_read = bearer(mint({"manage": [f"{base}/forks/*"], "read": [f"{base}/src/*"]}))
    assert http.put(gw.stream_url(f"{base}/forks/a"), headers={**fork, **with_read}).status_code == 201


def test_glob_star_stops_at_slash_and_double_star_crosses_it(
    auth_gateway: GatewayProcess, http: httpx.Client
) -> None:
    gw = auth_gateway
    base = f"g/{uuid.uuid4().hex[:10]}"
    admin = bearer(mint(ALL))
    for name in ("room-1", "room-1/sub"):
        assert http.put(gw.stream_url(f"{base}/{name}"), headers={**JSON, **admin}).status_code == 201
    star = bearer(mint({"read": [f"{base}/*"]}))
    double = bearer(mint({"read": [f"{base}/**"]}))
    assert http.head(gw.stream_url(f"{base}/room-1"), headers=star).status_code == 200
    assert http.head(gw.stream_url(f"{base}/room-1/sub"), headers=star).status_code == 403
    assert http.head(gw.stream_url(f"{base}/room-1/sub"), headers=double).status_code == 200


def test_open_endpoints_need_no_token(auth_gateway: GatewayProcess, http: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(auth_gateway.url + path).status_code == 200
    assert http.options(auth_gateway.stream_url("any")).status_code == 204  # CORS preflight


def test_scheme_other_than_bearer_is_401(auth_gateway: GatewayProcess, http: httpx.Client) -> None:
    response = http.head(auth_gateway.stream_url("x"), headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert 'error="invalid_request"' in response.headers["www-authenticate"]


# --- expiry during live reads ----------------------------------------------------------


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    event, data = "", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and event:
            yield event, "\n".join(data)
            event, data = "", []


def test_sse_ends_after_a_control_event_when_the_token_expires(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    name = f"exp/{uuid.uuid4().hex[:10]}"
    admin = bearer(mint(ALL))
    url = gw.stream_url(name)
    with httpx.Client(timeout=30) as client:
        assert client.put(url, headers={**JSON, **admin}).status_code == 201
        assert client.post(url, content=b'{"n":1}', headers={**JSON, **admin}).status_code == 204
        short = bearer(mint({"read": [name]}, ttl=3))
        events = []
        with client.stream("GET", url, params={"offset": "-1", "live": "sse"}, headers=short) as r:
            assert r.status_code == 200
            for event in sse_events(r.iter_lines()):
                events.append(event)
                if len(events) == 2:
                    # Mid-stream: this message must still arrive before the expiry.
                    client.post(url, content=b'{"n":2}', headers={**JSON, **admin})
        # The server ended the stream (iter_lines returned), well before its
        # 60 s lifetime, and the last event says where to resume.
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "control"
    data = [json.loads(d) for kind, d in events if kind == "data"]
    assert [m for batch in data for m in batch] == [{"n": 1}, {"n": 2}]
    tail = client_tail(gw, name)
    assert json.loads(events[-1][1])["streamNextOffset"] == tail
    # Resuming needs a new token: the old one is now refused as expired.
    expired = httpx.get(url, params={"offset": tail}, headers=short)
    assert expired.status_code == 401 and "expired" in expired.headers["www-authenticate"]


def client_tail(gw: GatewayProcess, name: str) -> str:
    return httpx.head(gw.stream_url(name), headers=bearer(mint(ALL))).headers["stream-next-offset"]


def test_long_poll_never_outlives_its_token(auth_gateway: GatewayProcess) -> None:
    gw = auth_gateway
    name = f"exp/{uuid.uuid4().hex[:10]}"
    url = gw.stream_url(name)
    assert httpx.put(url, headers={**JSON, **bearer(mint(ALL))}).status_code == 201
    short = bearer(mint({"read": [name]}, ttl=2))
    begun = time.monotonic()
    # DSGW_LONG_POLL_TIMEOUT_MS is 30 s on this gateway; the token ends it first.
    response = httpx.get(url, params={"offset": "now", "live": "long-poll"}, headers=short, timeout=40)
    assert response.status_code == 204
    assert response.headers["stream-up-to-date"] == "true"
    assert time.monotonic() - begun < 25


# --- API keys ----------------------------------------------------------------------------


def test_api_key_from_the_keys_file_and_reload(
    auth_gateway: GatewayProcess, auth_files: dict[str, Path]
) -> None:
    gw = auth_gateway
    name = f"keys/{uuid.uuid4().hex[:10]}"
    url = gw.stream_url(name)
    assert httpx.put(url, headers={**JSON, **bearer(API_KEY)}).status_code == 201
    new_key = "dsk_" + uuid.uuid4().hex
    assert httpx.head(url, headers=bearer(new_key)).status_code == 401
    path = auth_files["keys"]
    original = path.read_text()
    try:
        # Replace the file: the old key goes, a read-only key arrives.
        doc = {"keys": [{"name": "reader", "sha256": hash_key(new_key), "ds": {"read": ["keys/**"]}}]}
        path.write_text(json.dumps(doc))
        deadline = time.monotonic() + 15
        while httpx.head(url, headers=bearer(new_key)).status_code != 200:
            assert time.monotonic() < deadline, "the keys file was not reloaded"
            time.sleep(0.2)
        assert httpx.post(url, content=b"{}", headers={**JSON, **bearer(new_key)}).status_code == 403
        assert httpx.head(url, headers=bearer(API_KEY)).status_code == 401
        # A broken file keeps the last good keys.
        path.write_text("{not json")
        time.sleep(1.5)
        assert httpx.head(url, headers=bearer(new_key)).status_code == 200
    finally:
        path.write_text(original)
    deadline = time.monotonic() + 15
    while httpx.head(url, headers=bearer(API_KEY)).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


# --- JWKS --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg, kid", [("RS256", "rsa-1"), ("ES256", "ec-1")])
def test_jwks_keys_verify_tokens(auth_gateway: GatewayProcess, keys: Keys, alg: str, kid: str) -> None:
    private = keys.rsa if alg == "RS256" else keys.ec
    name = f"jwks/{uuid.uuid4().hex[:10]}"
    token = mint({"manage": [name]}, key=private, alg=alg, kid=kid)
    assert httpx.put(auth_gateway.stream_url(name), headers={**JSON, **bearer(token)}).status_code == 201
    # Signed by the right kind of key, but not the published one.
    other = (
        rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    )
    forged = mint({"manage": [name]}, key=other, alg=alg, kid=kid)
    assert httpx.head(auth_gateway.stream_url(name), headers=bearer(forged)).status_code == 401


def test_jwks_unknown_kid_triggers_a_refetch(
    auth_gateway: GatewayProcess, keys: Keys, auth_files: dict[str, Path]
) -> None:
    """Key rotation: a token signed with a key added to the JWKS after the
    gateway loaded it (EdDSA here) is accepted once the gateway refetches."""
    path = auth_files["jwks"]
    doc = json.loads(path.read_text())
    name = f"jwks/{uuid.uuid4().hex[:10]}"
    token = mint({"manage": [name]}, key=keys.ed, alg="EdDSA", kid="ed-new")
    doc["keys"].append(Keys.jwk(keys.ed, "ed-new", "EdDSA"))
    path.write_text(json.dumps(doc))
    # At most one refetch per 10 s for unknown kids: retry until it happens.
    deadline = time.monotonic() + 30
    while (
        status := httpx.put(auth_gateway.stream_url(name), headers={**JSON, **bearer(token)}).status_code
    ) == 401:
        assert time.monotonic() < deadline, "unknown kid never refetched"
        time.sleep(1)
    assert status == 201


def test_hs256_token_cannot_be_verified_with_a_public_key_as_secret(
    auth_gateway: GatewayProcess, auth_files: dict[str, Path]
) -> None:
    """Algorithm confusion: HS256 only ever uses DSGW_AUTH_JWT_SECRET."""
    secret = json.dumps(json.loads(auth_files["jwks"].read_text())["keys"][0]).encode()

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    # By hand: PyJWT itself refuses to sign with a JWK as HMAC secret.
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 60, "ds": ALL}
    signed = head + b"." + b64(json.dumps(claims).encode())
    forged = (signed + b"." + b64(hmac.new(secret, signed, hashlib.sha256).digest())).decode()
    assert httpx.head(auth_gateway.stream_url("x"), headers=bearer(forged)).status_code == 401


# --- README's worked example ------------------------------------------------------------


def dsgw_token(*args: str) -> str:
    env = {
        **os.environ,
        "DSGW_AUTH_JWT_SECRET": SECRET,
        "DSGW_AUTH_ISSUER": ISSUER,
        "DSGW_AUTH_AUDIENCE": AUDIENCE,
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_readme_ai_chat_example(auth_gateway: GatewayProcess, http: httpx.Client) -> None:
    """README, Authentication, 'Worked example: an AI chat', with `dsgw token`."""
    run = uuid.uuid4().hex[:6]
    mine, other = f"chat{run}/session-42", f"chat{run}/session-43"
    backend = bearer(dsgw_token("--manage", f"chat{run}/*", "--sub", "backend", "--ttl", "5m"))
    alice = bearer(dsgw_token("--read", mine, "--append", mine, "--sub", "user-7", "--ttl", "1h"))
    assistant = bearer(dsgw_token("--read", f"chat{run}/*", "--append", f"chat{run}/*", "--sub", "assistant"))
    s = auth_gateway.stream_url
    for name in (mine, other):
        assert http.put(s(name), headers={**backend, **JSON}).status_code == 201
    user_msg = b'{"type":"message","key":"m1","value":{"from":"user","text":"hi"}}'
    bot_msg = b'{"type":"message","key":"m2","value":{"from":"assistant","text":"hello!"}}'
    assert http.post(s(mine), content=user_msg, headers={**alice, **JSON}).status_code == 204
    assert http.post(s(mine), content=bot_msg, headers={**assistant, **JSON}).status_code == 204
    assert http.post(s(other), content=bot_msg, headers={**assistant, **JSON}).status_code == 204
    with http.stream("GET", s(mine), params={"offset": "-1", "live": "sse"}, headers=alice) as r:
        assert r.status_code == 200
    assert len(http.get(s(mine), params={"offset": "-1"}, headers=alice).json()) == 2
    assert http.get(s(other), params={"offset": "-1"}, headers=alice).status_code == 403
    assert http.post(s(other), content=user_msg, headers={**alice, **JSON}).status_code == 403
    assert http.delete(s(mine), headers=alice).status_code == 403
    assert http.delete(s(mine), headers=assistant).status_code == 403
    assert http.delete(s(mine), headers=backend).status_code == 204
