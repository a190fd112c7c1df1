"""One webhook delivery: POST a signed wake to a subscriber's URL, safely.

`deliver(url, body, headers) -> DeliveryResult` (or `WebhookClient.deliver`
with explicit settings). What makes it safe to point at URLs that untrusted
subscribers chose (see urlsafety.py for the address rules):

- the URL is checked again before every delivery (a setting may have changed
  since the subscription was created), and the name is resolved **once**: the
  connection goes to one of those checked addresses, never to a second lookup
  (DNS rebinding), while the ``Host`` header and the TLS SNI / certificate
  check keep the name;
- no redirect is followed: a 3xx is a failed delivery (a redirect could point
  anywhere, including inside our network);
- bounded: connect time (DSGW_WEBHOOK_CONNECT_TIMEOUT_MS), the whole delivery
  (DSGW_WEBHOOK_TIMEOUT_MS), the response read (at most
  DSGW_WEBHOOK_MAX_RESPONSE_BYTES, then the connection is dropped; response
  headers at most h11's 16 KiB), the body sent (DSGW_WEBHOOK_MAX_PAYLOAD_BYTES)
  and deliveries in flight per process (DSGW_WEBHOOK_MAX_CONCURRENCY, a
  semaphore: more wait for a slot before their clock starts).

The HTTP/1.1 exchange is parsed by h11 (already installed: uvicorn's own
parser), not by hand: chunked and length-delimited responses, and malformed
ones refused, without a new dependency or a client library that would resolve
names and follow redirects by itself.

Outcome: `status` (None when no response came), `done` (the response was 2xx
and its body the JSON object ``{"done": true, ...}``), `error` (None for a 2xx;
otherwise why the delivery failed, for the retry schedule and the logs). A 2xx
whose body is slow or too large still counts as delivered, with done false.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import h11

from ..settings import Settings
from .urlsafety import WebhookUrlRejected, check_callback_url, resolve_target, split_url

USER_AGENT = "ds-gateway-webhook/1"
# Characters left as they are in the request target (the rest is percent-encoded).
URL_SAFE = "/%:@!$&'()*+,;=-._~?"
READ_SIZE = 4096


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: int | None
    done: bool
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Exchange:
    """What one attempt learned so far (kept when the clock runs out)."""

    status: int | None = None
    body: bytes = b""
    truncated = False


def ascii_host(host: str) -> str:
    """An internationalised name as it goes on the wire (DNS, Host, SNI): IDNA."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise WebhookUrlRejected(f"webhook host {host!r} is not a valid name") from exc


def parse_done(body: bytes) -> bool:
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("done") is True


class WebhookClient:
    """Deliveries under one set of limits (the DSGW_WEBHOOK_* settings)."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.allow_private = settings.webhook_allow_private
        self.connect_timeout_s = settings.webhook_connect_timeout_ms / 1000
        self.timeout_s = settings.webhook_timeout_ms / 1000
        self.max_response_bytes = settings.webhook_max_response_bytes
        self.max_payload_bytes = settings.webhook_max_payload_bytes
        # Certificates are verified against the system's CAs; tests pass their own.
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.semaphore = asyncio.Semaphore(max(1, settings.webhook_max_concurrency))

    async def deliver(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
        if len(body) > self.max_payload_bytes:
            return DeliveryResult(None, False, f"payload of {len(body)} bytes over the limit")
        try:
            check_callback_url(url, self.allow_private)
        except WebhookUrlRejected as exc:
            return DeliveryResult(None, False, f"url rejected: {exc.message}")
        async with self.semaphore:
            seen = _Exchange()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._exchange(url, body, headers, seen)
            except TimeoutError:
                if seen.status is None or not 200 <= seen.status < 300:
                    return DeliveryResult(seen.status, False, "timed out")
                seen.truncated = True  # accepted; its body came too slowly to read
            except WebhookUrlRejected as exc:
                return DeliveryResult(None, False, f"url rejected: {exc.message}")
            except (OSError, h11.ProtocolError) as exc:  # ssl.SSLError is an OSError
                return DeliveryResult(seen.status, False, f"{type(exc).__name__}: {exc}"[:300])
        status = seen.status
        if status is None:
            return DeliveryResult(None, False, "connection closed before a response")
        if 300 <= status < 400:
            return DeliveryResult(status, False, f"redirect not followed (HTTP {status})")
        if not 200 <= status < 300:
            return DeliveryResult(status, False, f"HTTP {status}")
        return DeliveryResult(status, not seen.truncated and parse_done(seen.body), None)

    async def _exchange(self, url: str, body: bytes, headers: dict[str, str], seen: _Exchange) -> None:
        parts = split_url(url)
        host = ascii_host(parts.hostname or "")
        tls = parts.scheme.lower() == "https"
        port = parts.port or (443 if tls else 80)
        addresses = await resolve_target(host, port, self.allow_private)
        reader, writer = await self._connect(addresses, port, host if tls else None)
        try:
            conn = h11.Connection(h11.CLIENT)
            target = quote(parts.path or "/", safe=URL_SAFE) + (
                f"?{quote(parts.query, safe=URL_SAFE)}" if parts.query else ""
            )
            host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
            request_headers = [
                ("Host", host_header),
                ("User-Agent", USER_AGENT),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *(
                    (k, v)
                    for k, v in headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                ),
            ]
            if not any(k.lower() == "content-type" for k, _ in request_headers):
                request_headers.append(("Content-Type", "application/json"))
            writer.write(conn.send(h11.Request(method="POST", target=target, headers=request_headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            await self._read_response(conn, reader, seen)
        finally:
            # Drop the connection at once: nothing more is read from it, and a
            # TLS close handshake with a stalling peer must not hold us.
            writer.transport.abort()

    async def _connect(
        self, addresses: list[str], port: int, server_hostname: str | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: BaseException | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    return await asyncio.open_connection(
                        address,
                        port,
                        ssl=self.ssl_context if server_hostname else None,
                        server_hostname=server_hostname,
                    )
            except TimeoutError:
                last = OSError(f"connect to {address}:{port} timed out")
            except OSError as exc:
                last = exc
        raise last if isinstance(last, OSError) else OSError("no address to connect to")

    async def _read_response(
        self, conn: h11.Connection, reader: asyncio.StreamReader, seen: _Exchange
    ) -> None:
        limit = self.max_response_bytes
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.Response):
                seen.status = event.status_code
            elif isinstance(event, h11.Data):
                seen.body += bytes(event.data[: limit - len(seen.body) + 1])
                if len(seen.body) > limit:
                    seen.body, seen.truncated = seen.body[:limit], True
                    return
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
            # h11.InformationalResponse (100 Continue, ...): keep reading.


_default: WebhookClient | None = None


def configure(settings: Settings, ssl_context: ssl.SSLContext | None = None) -> WebhookClient:
    """Set the process's client from settings (called once at startup)."""
    global _default
    _default = WebhookClient(settings, ssl_context)
    return _default


async def deliver(url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
    """Deliver with the process's client (from the environment if not configured)."""
    client = _default or configure(Settings.from_env())
    return await client.deliver(url, body, headers)
