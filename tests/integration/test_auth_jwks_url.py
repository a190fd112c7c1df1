"""DSGW_AUTH_JWKS as an http URL: keys fetched from it, fetched again
periodically (DSGW_AUTH_JWKS_REFRESH_S), so a key removed from the JWKS stops
verifying new tokens, and a server that fails keeps the last good keys."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import GatewayProcess, start_gateway
from tests.integration.test_auth import JSON, Keys, bearer, mint


class JwksServer:
    """Serves `doc` at /jwks.json; `fail` makes it answer 500."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.fail = False
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                body = json.dumps(server.doc).encode()
                self.send_response(500 if server.fail else 200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def url_gateway(
    redis_server: Any, tmp_path_factory: pytest.TempPathFactory, jwks_server: JwksServer
) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        redis_server.url,
        tmp_path_factory.mktemp("gw-jwks-url"),
        DSGW_AUTH_JWKS=jwks_server.url,
        DSGW_AUTH_JWKS_REFRESH_S="1",
    )
    yield gw
    gw.stop()


def test_keys_come_from_the_url_and_removed_keys_stop_working(
    url_gateway: GatewayProcess, jwks_server: JwksServer
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.doc = {"keys": [Keys.jwk(first, "k1", "ES256"), Keys.jwk(second, "k2", "ES256")]}
    base = f"url/{uuid.uuid4().hex[:8]}"
    scope = {"manage": [f"{base}/*"], "read": [f"{base}/*"]}

    def status(key: Any, kid: str, name: str) -> int:
        token = mint(scope, key=key, alg="ES256", kid=kid)
        return httpx.put(
            url_gateway.stream_url(f"{base}/{name}"), headers={**JSON, **bearer(token)}
        ).status_code

    assert status(first, "k1", "a") == 201
    assert status(second, "k2", "b") == 201

    # The JWKS server fails for a while: the gateway keeps the keys it has.
    jwks_server.fail = True
    seen = jwks_server.requests
    deadline = time.monotonic() + 20
    while jwks_server.requests == seen:  # a periodic refresh happened (and failed)
        assert status(first, "k1", f"c{uuid.uuid4().hex[:4]}") == 201
        assert time.monotonic() < deadline, "no periodic JWKS refresh"
        time.sleep(0.3)
    assert status(first, "k1", "d") == 201
    jwks_server.fail = False

    # k1 rotated out: new tokens signed with it are refused after the next refresh.
    jwks_server.doc = {"keys": [Keys.jwk(second, "k2", "ES256")]}
    deadline = time.monotonic() + 20
    while status(first, "k1", f"e{uuid.uuid4().hex[:4]}") != 401:
        assert time.monotonic() < deadline, "a removed key kept verifying new tokens"
        time.sleep(0.3)
    assert status(second, "k2", "f") == 201
