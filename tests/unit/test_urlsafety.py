"""Which webhook URLs a subscription may name (gateway/subscriptions/urlsafety.py)."""

from __future__ import annotations

import pytest

from gateway.subscriptions.urlsafety import WebhookUrlRejected, check_callback_url, resolve_target

# (url, accepted by default, accepted with allow_private)
TABLE = [
    ("https://hooks.example.com/ds", True, True),
    ("https://hooks.example.com:8443/a/b?c=d", True, True),
    ("HTTPS://Hooks.Example.com/x", True, True),
    ("https://8.8.8.8/hook", True, True),
    ("https://[2001:4860:4860::8888]/hook", True, True),
    # http only in development (PROTOCOL.md 12.8)
    ("http://hooks.example.com/ds", False, True),
    ("http://127.0.0.1:9000/webhook", False, True),
    ("http://localhost:9000/webhook", False, True),
    # other schemes, malformed
    ("ftp://hooks.example.com/x", False, False),
    ("file:///etc/passwd", False, False),
    ("gopher://127.0.0.1:6379/_FLUSHALL", False, False),
    ("javascript:alert(1)", False, False),
    ("hooks.example.com/ds", False, False),
    ("https://", False, False),
    ("https:///path", False, False),
    ("", False, False),
    ("https://hooks.example.com:99999/", False, False),
    ("https://hooks.example.com:port/", False, False),
    ("https://hooks.example.com/a b", False, False),
    ("https://hooks.example.com/\r\nX-Injected: 1", False, False),
    ("https://example.com/" + "a" * 3000, False, False),
    # userinfo
    ("https://user:pass@hooks.example.com/", False, False),
    ("https://user@hooks.example.com/", False, False),
    ("https://hooks.example.com@127.0.0.1/", False, False),
    # private, loopback, link-local, metadata, multicast, unspecified
    ("https://10.0.0.1/hook", False, True),
    ("http://10.0.0.1/hook", False, True),
    ("https://172.16.5.4/", False, True),
    ("https://172.31.255.255/", False, True),
    ("https://192.168.1.1/", False, True),
    ("https://127.0.0.1/", False, True),
    ("https://127.255.0.9/", False, True),
    ("https://169.254.169.254/latest/meta-data/", False, True),
    ("https://100.64.0.1/", False, True),
    ("https://0.0.0.0/", False, True),
    ("https://224.0.0.1/", False, True),
    ("https://255.255.255.255/", False, True),
    ("https://192.0.2.10/", False, True),
    ("https://[::1]/", False, True),
    ("https://[::]/", False, True),
    ("https://[fe80::1]/", False, True),
    ("https://[fe80::1%25eth0]/", False, True),
    ("https://[fc00::1]/", False, True),
    ("https://[fd12:3456::1]/", False, True),
    ("https://[ff02::1]/", False, True),
    # IPv6 forms that embed an IPv4 address
    ("https://[::ffff:127.0.0.1]/", False, True),
    ("https://[::ffff:10.0.0.1]/", False, True),
    ("https://[::ffff:8.8.8.8]/", False, True),
    ("https://[::127.0.0.1]/", False, True),
    ("https://[2002:7f00:1::]/", False, True),
    ("https://[64:ff9b::7f00:1]/", False, True),
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", False, True),
    # IPv4 in the forms inet_aton accepts
    ("https://127.1/", False, True),
    ("https://2130706433/", False, True),
    ("https://0x7f.0.0.1/", False, True),
    ("https://0177.0.0.1/", False, True),
    ("https://012.1/", False, True),
    # names that always mean this machine
    ("https://localhost/", False, True),
    ("https://LOCALHOST./", False, True),
    ("https://api.localhost/", False, True),
]


@pytest.mark.parametrize(("url", "default", "private"), TABLE, ids=[row[0][:60] for row in TABLE])
def test_callback_url_table(url: str, default: bool, private: bool) -> None:
    for allow_private, expected in ((False, default), (True, private)):
        if expected:
            check_callback_url(url, allow_private=allow_private)
        else:
            with pytest.raises(WebhookUrlRejected) as err:
                check_callback_url(url, allow_private=allow_private)
            assert err.value.code == "WEBHOOK_URL_REJECTED" and err.value.status == 400


async def test_resolution_refuses_private_results_unless_allowed() -> None:
    # "localhost" resolves (from /etc/hosts) to loopback: a name that passed the
    # creation check must still not reach a private address at delivery.
    with pytest.raises(WebhookUrlRejected, match="loopback"):
        await resolve_target("localhost", 80, allow_private=False)
    assert "127.0.0.1" in await resolve_target("localhost", 80, allow_private=True)
    assert await resolve_target("8.8.8.8", 443, allow_private=False) == ["8.8.8.8"]
    with pytest.raises(WebhookUrlRejected, match="does not resolve"):
        await resolve_target("no-such-host.invalid", 443, allow_private=True)


async def test_one_private_address_among_public_ones_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import socket

    async def fake_getaddrinfo(host, port, **kwargs):  # type: ignore[no-untyped-def]
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(WebhookUrlRejected, match="10.1.2.3"):
        await resolve_target("mixed.example", 443, allow_private=False)
