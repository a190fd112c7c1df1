"""Webhook delivery against real local HTTP receivers (gateway/subscriptions/webhook.py):
no redirect followed, timeouts, bounded response reads, bounded concurrency,
private targets refused unless allowed, a name resolved once (rebinding), Host
and TLS SNI kept as the name."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.settings import Settings
from gateway.subscriptions.webhook import DeliveryResult, WebhookClient

# A test that would hang without the behaviour under test fails after this instead.
GUARD_S = 30


@dataclass
class Request:
    target: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Receiver:
    """A raw asyncio HTTP/1.1 receiver whose answer a test writes byte by byte."""

    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    max_open: int = 0
    sent: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server:
            self.server.close()

    def url(self, host: str = "127.0.0.1", scheme: str = "http", path: str = "/hook") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(lines[0].split(" ")[1], headers, body)
            self.requests.append(request)
            await self.handler(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


def reply(status: int, body: bytes = b"", extra: str = "") -> Handler:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return handler


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> Receiver:
        receiver = await Receiver(handler, ssl_context).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.close()


def limits(**overrides: object) -> Settings:
    """Settings with webhook_<name>=value for each override (private targets allowed unless said)."""
    values = {"allow_private": "true", "timeout_ms": 5_000, **overrides}
    return dataclasses.replace(Settings(), **{f"webhook_{k}": v for k, v in values.items()})  # type: ignore[arg-type]


def client(**overrides: object) -> WebhookClient:
    return WebhookClient(limits(**overrides))


async def deliver(
    c: WebhookClient, url: str, body: bytes = b'{"wake_id":"w_1"}', **headers: str
) -> DeliveryResult:
    return await asyncio.wait_for(c.deliver(url, body, headers), GUARD_S)


@pytest.fixture
async def resolve_names(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Make the names in the returned dict resolve to the given address (all
    other names as usual); counts lookups, so a test can show one per delivery."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    names: dict[str, object] = {"lookups": 0}

    async def fake(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in names:
            names["lookups"] = int(names["lookups"]) + 1  # type: ignore[call-overload]
            return [(2, 1, 6, "", (names[host], port))]
        return await real(host, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", fake)
    return names


async def test_delivers_the_body_and_reads_done(receivers) -> None:  # type: ignore[no-untyped-def]
    done = await receivers(reply(200, b'{"done": true}', "content-type: application/json\r\n"))
    body = b'{"subscription_id":"s","wake_id":"w_1"}'
    result = await deliver(
        client(), done.url(path="/hook?x=1"), body, **{"Webhook-Signature": "t=1,kid=k,ed25519=s"}
    )
    assert result == DeliveryResult(200, True, None)
    (request,) = done.requests
    assert request.body == body and request.target == "/hook?x=1"
    assert request.headers["host"] == f"127.0.0.1:{done.port}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-signature"] == "t=1,kid=k,ed25519=s"

    for answer, expected_done in [
        (b"{}", False),
        (b'{"done": "yes"}', False),
        (b"not json", False),
        (b"", False),
    ]:
        r = await receivers(reply(200, answer))
        assert await deliver(client(), r.url()) == DeliveryResult(200, expected_done, None)

    async def chunked(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n6\r\n{"done\r\n8\r\n": true}\r\n0\r\n\r\n'
        )
        await writer.drain()

    r = await receivers(chunked)
    assert await deliver(client(), r.url()) == DeliveryResult(202, True, None)


async def test_error_statuses_fail(receivers) -> None:  # type: ignore[no-untyped-def]
    r = await receivers(reply(500, b'{"done": true}'))
    result = await deliver(client(), r.url())
    assert (result.status, result.done, result.ok) == (500, False, False) and result.error == "HTTP 500"
    closed = await receivers(lambda request, writer: asyncio.sleep(0))  # closes without answering
    result = await deliver(client(), closed.url())
    assert result.status is None and not result.ok


async def test_a_redirect_is_not_followed(receivers) -> None:  # type: ignore[no-untyped-def]
    target = await receivers(reply(200, b'{"done": true}'))
    for status in (301, 302, 303, 307, 308):
        redirect = await receivers(reply(status, b"", f"location: {target.url()}\r\n"))
        result = await deliver(client(), redirect.url())
        assert result.status == status and not result.done and "redirect not followed" in (result.error or "")
        assert len(redirect.requests) == 1
    assert target.connections == 0


async def test_a_slow_receiver_times_out(receivers) -> None:  # type: ignore[no-untyped-def]
    stall = asyncio.Event()  # never set: the receiver never answers

    async def silent(request: Request, writer: asyncio.StreamWriter) -> None:
        await stall.wait()

    r = await receivers(silent)
    result = await deliver(client(timeout_ms=300), r.url())
    assert result == DeliveryResult(None, False, "timed out")
    assert len(r.requests) == 1

    # Headers of a 2xx came, then the body stalls: delivered, not done.
    async def slow_body(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
        await writer.drain()
        await stall.wait()

    r = await receivers(slow_body)
    # (2 s: room for the headers to arrive even on a loaded machine; the body never does.)
    assert await deliver(client(timeout_ms=2000), r.url()) == DeliveryResult(200, False, None)


async def test_a_huge_response_is_read_only_up_to_the_bound(receivers) -> None:  # type: ignore[no-untyped-def]
    huge = 256 * 1024 * 1024

    async def flood(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {huge}\r\n\r\n".encode() + b'{"done": true,')
        chunk = b" " * 65536
        while receiver.sent < huge:
            writer.write(chunk)
            await writer.drain()  # raises once the client dropped the connection
            receiver.sent += len(chunk)

    receiver = await receivers(flood)
    result = await deliver(client(max_response_bytes=4096), receiver.url())
    assert result == DeliveryResult(200, False, None)
    # The client hung up after its 4 KiB: the receiver got no further than the socket buffers.
    assert receiver.sent < 64 * 1024 * 1024

    async def huge_headers(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        await writer.drain()

    r = await receivers(huge_headers)
    result = await deliver(client(), r.url())
    assert result.status is None and not result.ok


async def test_a_private_target_is_refused_unless_allowed(receivers) -> None:  # type: ignore[no-untyped-def]
    r = await receivers(reply(200, b'{"done": true}'))
    for url in (r.url(), r.url(scheme="https"), r.url(host="localhost"), r.url(host="[::ffff:127.0.0.1]")):
        result = await deliver(client(allow_private="false"), url)
        assert result.status is None and (result.error or "").startswith("url rejected"), url
    assert r.connections == 0
    assert await deliver(client(allow_private="true"), r.url()) == DeliveryResult(200, True, None)


async def test_the_loopback_level_reaches_loopback_only(receivers, resolve_names) -> None:  # type: ignore[no-untyped-def]
    r = await receivers(reply(200, b'{"done": true}'))
    loopback = client(allow_private="loopback")
    assert await deliver(loopback, r.url()) == DeliveryResult(200, True, None)
    assert await deliver(loopback, r.url(host="localhost")) == DeliveryResult(200, True, None)
    # A name answering a private address at delivery is refused at this level.
    resolve_names["hooks.private.test"] = "10.0.0.1"
    result = await deliver(loopback, r.url(host="hooks.private.test", scheme="https"))
    assert result.status is None and "resolves to a private" in (result.error or "")
    result = await deliver(loopback, "http://10.0.0.1:9/hook")
    assert result.status is None and (result.error or "").startswith("url rejected")
    assert r.connections == 2


async def test_a_name_resolving_to_loopback_is_refused_at_delivery(receivers, resolve_names) -> None:  # type: ignore[no-untyped-def]
    # The name passes the creation-time check (https, not an address), but at
    # delivery it resolves to 127.0.0.1: refused before any connection.
    r = await receivers(reply(200, b'{"done": true}'))
    resolve_names["hooks.rebind.test"] = "127.0.0.1"
    result = await deliver(client(allow_private="false"), r.url(host="hooks.rebind.test", scheme="https"))
    assert result.status is None and "resolves to a loopback address" in (result.error or "")
    assert r.connections == 0


async def test_the_name_is_resolved_once_and_kept_in_host(receivers, resolve_names) -> None:  # type: ignore[no-untyped-def]
    r = await receivers(reply(200, b'{"done": true}'))
    resolve_names["hooks.example.test"] = "127.0.0.1"
    result = await deliver(client(allow_private="true"), r.url(host="hooks.example.test"))
    assert result == DeliveryResult(200, True, None)
    assert resolve_names["lookups"] == 1
    assert r.requests[0].headers["host"] == f"hooks.example.test:{r.port}"
    # An internationalised name travels as IDNA (lookup and Host); a raw path is percent-encoded.
    resolve_names["xn--bcher-kva.test"] = "127.0.0.1"
    result = await deliver(client(allow_private="true"), r.url(host="bücher.test", path="/hook/é?a=ü"))
    assert result == DeliveryResult(200, True, None)
    assert r.requests[1].headers["host"] == f"xn--bcher-kva.test:{r.port}"
    assert r.requests[1].target == "/hook/%C3%A9?a=%C3%BC"


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_tls_sni_and_certificate_check_use_the_name(receivers, resolve_names, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed(tmp_path, "hooks.tls.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)  # type: ignore[assignment,misc]
    r = await receivers(reply(200, b'{"done": true}'), ssl_context=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    tls_client = WebhookClient(limits(), client_ctx)
    resolve_names["hooks.tls.test"] = "127.0.0.1"
    resolve_names["other.tls.test"] = "127.0.0.1"

    result = await deliver(tls_client, r.url(host="hooks.tls.test", scheme="https"))
    assert result == DeliveryResult(200, True, None)
    assert seen_sni == ["hooks.tls.test"]
    assert r.requests[0].headers["host"] == f"hooks.tls.test:{r.port}"
    # The same server under a name its certificate does not cover: refused.
    result = await deliver(tls_client, r.url(host="other.tls.test", scheme="https"))
    assert result.status is None and "SSL" in (result.error or "")


async def test_concurrency_is_bounded_per_client(receivers) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def held(request: Request, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await reply(200, b'{"done": true}')(request, writer)

    r = await receivers(held)
    bounded = client(max_concurrency=2, timeout_ms=GUARD_S * 1000)
    tasks = [asyncio.create_task(bounded.deliver(r.url(), b"{}", {})) for _ in range(5)]
    deadline = asyncio.get_running_loop().time() + GUARD_S
    while r.open_now < 2:
        assert asyncio.get_running_loop().time() < deadline, "two deliveries never arrived"
        await asyncio.sleep(0.01)
    assert bounded.semaphore.locked()  # the other three wait for a slot, unconnected
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), GUARD_S)
    assert all(result == DeliveryResult(200, True, None) for result in results)
    assert r.connections == 5 and r.max_open == 2


async def test_oversized_payloads_and_bad_headers_are_not_sent(receivers) -> None:  # type: ignore[no-untyped-def]
    r = await receivers(reply(200, b'{"done": true}'))
    result = await deliver(client(max_payload_bytes=10), r.url(), b"x" * 11)
    assert result.status is None and "over the limit" in (result.error or "")
    result = await deliver(client(), r.url(), b"{}", **{"X-Evil": "a\r\nHost: elsewhere"})
    assert result.status is None and not result.ok
    assert r.requests == []
