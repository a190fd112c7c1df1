"""Webhook URL safety (SSRF): which callback URLs a subscription may name, and
which addresses a delivery may connect to.

Two checks, because a name's addresses can change between them:

- `check_callback_url` when a subscription is created (and again before every
  delivery): scheme, userinfo, port, and hosts that are addresses (or
  ``localhost``) in a range we refuse. Names are not resolved here.
- `resolve_target` at delivery: the name is resolved once, every address it
  resolves to must be allowed (a name answering one public and one private
  address is refused), and the delivery connects to those addresses, never
  resolving again (DNS rebinding: a name that was public when checked and
  answers 127.0.0.1 at delivery never reaches 127.0.0.1).

Refused by default: every address that is not globally routable (loopback,
RFC 1918, link-local including 169.254.169.254, CGNAT, unique-local,
unspecified, documentation and benchmark ranges, reserved), multicast, and
every IPv6 form that embeds an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-compatible, 6to4, Teredo, NAT64 ``64:ff9b::/96``), whatever it embeds;
and plain ``http://`` (PROTOCOL.md 12.8 asks for HTTPS in production).
DSGW_WEBHOOK_ALLOW_PRIVATE relaxes this in three levels (`LEVELS`):

- ``false``: only the above.
- ``loopback``: loopback targets too (127.0.0.0/8, ``::1``, ``localhost`` and
  ``*.localhost``), over http or https: development and the conformance runs,
  whose receiver is on 127.0.0.1 while ``http://10.0.0.1/`` must be refused
  (as the reference server does). Every other rule stays.
- ``true``: every non-public address, over http too (a trusted network).

IPv4 hosts are parsed the way the system resolver parses them (``inet_aton``:
``127.1``, ``0x7f.0.0.1`` and ``2130706433`` are all 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_BYTES = 2048
SCHEMES = ("http", "https")
# A name ending in .localhost always means this machine (RFC 6761).
LOCAL_NAMES = ("localhost", "localhost.")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# DSGW_WEBHOOK_ALLOW_PRIVATE's values, from strictest.
ALLOW_NONE, ALLOW_LOOPBACK, ALLOW_ALL = "false", "loopback", "true"
LEVELS = (ALLOW_NONE, ALLOW_LOOPBACK, ALLOW_ALL)


class WebhookUrlRejected(ValueError):
    """The protocol's WEBHOOK_URL_REJECTED (400)."""

    code = "WEBHOOK_URL_REJECTED"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def address_refused(ip: IPAddress) -> str | None:
    """Why a delivery may not connect to `ip` by default, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if ip.sixtofour is not None or ip.teredo is not None or ip in NAT64:
            return "an IPv6 address embedding an IPv4 address"
        if ip.packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d, deprecated IPv4-compatible
            return "an IPv6 address embedding an IPv4 address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or ip.is_reserved or not ip.is_global:
        return "a private or reserved address"
    return None


def parse_host_address(host: str) -> IPAddress | None:
    """`host` as an IP address if it is one (in any form the resolver accepts)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0] if ":" in bare else bare)
    except ValueError:
        pass
    if ":" in bare:
        return None
    try:
        # Shorthand and numeric IPv4 forms ("127.1", "2130706433", "0x7f.1").
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except OSError:
        return None


def split_url(url: str) -> SplitResult:
    """`url` split, or WebhookUrlRejected for anything that is not a plain
    http(s) URL with a host (no userinfo, valid port, no control characters)."""
    if not isinstance(url, str) or not url or len(url.encode()) > MAX_URL_BYTES:
        raise WebhookUrlRejected(f"webhook.url must be a URL of at most {MAX_URL_BYTES} bytes")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise WebhookUrlRejected("webhook.url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise WebhookUrlRejected("webhook.url is not a valid URL") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise WebhookUrlRejected("webhook.url must use https (or http in development)")
    if "@" in parts.netloc:
        raise WebhookUrlRejected("webhook.url must not contain a user name or password")
    if not parts.hostname:
        raise WebhookUrlRejected("webhook.url must name a host")
    return parts


def is_loopback(ip: IPAddress) -> bool:
    """127.0.0.0/8 or ::1 itself (no IPv4-mapped or other embedding forms)."""
    return ip.is_loopback and not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped)


def _local_name(host: str) -> bool:
    return host in LOCAL_NAMES or host.rstrip(".").endswith(".localhost")


def check_callback_url(url: str, allow_private: str) -> None:
    """Raise WebhookUrlRejected unless `url` may receive webhooks at level
    `allow_private` (one of LEVELS)."""
    parts = split_url(url)
    if allow_private == ALLOW_ALL:
        return
    host = (parts.hostname or "").lower()
    ip = parse_host_address(host)
    if allow_private == ALLOW_LOOPBACK and (_local_name(host) if ip is None else is_loopback(ip)):
        return  # http too: a development receiver has no certificate
    if parts.scheme.lower() != "https":
        raise WebhookUrlRejected(
            "webhook.url must use https (http only for a loopback receiver in development)"
        )
    if _local_name(host):
        raise WebhookUrlRejected("webhook.url must not target this machine")
    if ip is not None and (reason := address_refused(ip)):
        raise WebhookUrlRejected(f"webhook.url must not target {reason}")


async def resolve_target(host: str, port: int, allow_private: str) -> list[str]:
    """The addresses to connect to for `host`, resolved exactly once; raises
    WebhookUrlRejected if any of them is refused at level `allow_private` (or
    the name does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlRejected(f"webhook host {host!r} does not resolve") from exc
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        text = str(sockaddr[0])
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise WebhookUrlRejected(f"webhook host {host!r} does not resolve")
    if allow_private != ALLOW_ALL:
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            if allow_private == ALLOW_LOOPBACK and is_loopback(ip):
                continue
            reason = address_refused(ip)
            if reason:
                raise WebhookUrlRejected(f"webhook host {host!r} resolves to {reason} ({text})")
    return addresses
