"""Which webhook URLs a subscription may name (gateway/subscriptions/urlsafety.py)."""

from __future__ import annotations

import pytest

from gateway.subscriptions.urlsafety import WebhookUrlRejected, check_callback_url, resolve_target

# (url, accepted with DSGW_WEBHOOK_ALLOW_PRIVATE false, loopback, true)
TABLE = [
    ("https://hooks.example.com/ds", True, True, True),
    ("https://hooks.example.com:8443/a/b?c=d", True, True, True),
    ("HTTPS://Hooks.Example.com/x", True, True, True),
    ("https://8.8.8.8/hook", True, True, True),
    ("https://[2001:4860:4860::8888]/hook", True, True, True),
    # http only in development (PROTOCOL.md 12.8)
    ("http://hooks.example.com/ds", False, False, True),
    ("http://127.0.0.1:9000/webhook", False, True, True),
    ("http://localhost:9000/webhook", False, True, True),
    ("http://127.3.2.1:9000/webhook", False, True, True),
    ("http://[::1]:9000/webhook", False, True, True),
    ("http://api.localhost/webhook", False, True, True),
    # other schemes, malformed
    ("ftp://hooks.example.com/x", False, False, False),
    ("file:///etc/passwd", False, False, False),
    ("gopher://127.0.0.1:6379/_FLUSHALL", False, False, False),
    ("javascript:alert(1)", False, False, False),
    ("hooks.example.com/ds", False, False, False),
    ("https://", False, False, False),
    ("https:///path", False, False, False),
    ("", False, False, False),
    ("https://hooks.example.com:99999/", False, False, False),
    ("https://hooks.example.com:port/", False, False, False),
    ("https://hooks.example.com/a b", False, False, False),
    ("https://hooks.example.com/\r\nX-Injected: 1", False, False, False),
    ("https://example.com/" + "a" * 3000, False, False, False),
    # userinfo
    ("https://user:pass@hooks.example.com/", False, False, False),
    ("https://user@hooks.example.com/", False, False, False),
    ("https://hooks.example.com@127.0.0.1/", False, False, False),
    # private, loopback, link-local, metadata, multicast, unspecified
    ("https://10.0.0.1/hook", False, False, True),
    ("http://10.0.0.1/hook", False, False, True),  # the official suite's "rejects unsafe webhook URLs"
    ("http://169.254.169.254/latest/meta-data/", False, False, True),
    ("http://192.168.1.1:8080/", False, False, True),
    ("https://172.16.5.4/", False, False, True),
    ("https://172.31.255.255/", False, False, True),
    ("https://192.168.1.1/", False, False, True),
    ("https://127.0.0.1/", False, True, True),
    ("https://127.255.0.9/", False, True, True),
    ("https://169.254.169.254/latest/meta-data/", False, False, True),
    ("https://100.64.0.1/", False, False, True),
    ("https://0.0.0.0/", False, False, True),
    ("https://224.0.0.1/", False, False, True),
    ("https://255.255.255.255/", False, False, True),
    ("https://192.0.2.10/", False, False, True),
    ("https://[::1]/", False, True, True),
    ("https://[::]/", False, False, True),
    ("https://[fe80::1]/", False, False, True),
    ("https://[fe80::1%25eth0]/", False, False, True),
    ("https://[fc00::1]/", False, False, True),
    ("https://[fd12:3456::1]/", False, False, True),
    ("https://[ff02::1]/", False, False, True),
    # IPv6 forms that embed an IPv4 address
    ("https://[::ffff:127.0.0.1]/", False, False, True),
    ("https://[::ffff:10.0.0.1]/", False, False, True),
    ("https://[::ffff:8.8.8.8]/", False, False, True),
    ("https://[::127.0.0.1]/", False, False, True),
    ("https://[2002:7f00:1::]/", False, False, True),
    ("https://[64:ff9b::7f00:1]/", False, False, True),
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", False, False, True),
    # IPv4 in the forms inet_aton accepts
    ("https://127.1/", False, True, True),
    ("https://2130706433/", False, True, True),
    ("https://0x7f.0.0.1/", False, True, True),
    ("https://0177.0.0.1/", False, True, True),
    ("https://012.1/", False, False, True),
    # names that always mean this machine
    ("https://localhost/", False, True, True),
    ("https://LOCALHOST./", False, True, True),
    ("https://api.localhost/", False, True, True),
]


@pytest.mark.parametrize(("url", "none", "loopback", "every"), TABLE, ids=[row[0][:60] for row in TABLE])
def test_callback_url_table(url: str, none: bool, loopback: bool, every: bool) -> None:
    for level, expected in (("false", none), ("loopback", loopback), ("true", every)):
        if expected:
            check_callback_url(url, allow_private=level)
        else:
            with pytest.raises(WebhookUrlRejected) as err:
                check_callback_url(url, allow_private=level)
            assert err.value.code == "WEBHOOK_URL_REJECTED" and err.value.status == 400


async def test_resolution_refuses_private_results_unless_allowed() -> None:
    # "localhost" resolves (from /etc/hosts) to loopback: a name that passed the
    # creation check must still not reach a private address at delivery.
    with pytest.raises(WebhookUrlRejected, match="loopback"):
        await resolve_target("localhost", 80, allow_private="false")
    assert "127.0.0.1" in await resolve_target("localhost", 80, allow_private="loopback")
    assert "127.0.0.1" in await resolve_target("localhost", 80, allow_private="true")
    assert await resolve_target("8.8.8.8", 443, allow_private="false") == ["8.8.8.8"]
    with pytest.raises(WebhookUrlRejected, match="does not resolve"):
        await resolve_target("no-such-host.invalid", 443, allow_private="true")


@pytest.mark.parametrize(
    ("answer", "level", "accepted"),
    [
        ("127.0.0.1", "loopback", True),
        ("::1", "loopback", True),
        ("10.1.2.3", "loopback", False),
        ("169.254.169.254", "loopback", False),
        ("::ffff:127.0.0.1", "loopback", False),
        ("10.1.2.3", "true", True),
        ("127.0.0.1", "false", False),
    ],
)
async def test_resolution_follows_the_levels(
    monkeypatch: pytest.MonkeyPatch, answer: str, level: str, accepted: bool
) -> None:
    # DNS rebinding: a public-looking name answering a private address at delivery.
    import asyncio
    import socket

    family = socket.AF_INET6 if ":" in answer else socket.AF_INET

    async def fake_getaddrinfo(host, port, **kwargs):  # type: ignore[no-untyped-def]
        return [(family, socket.SOCK_STREAM, 6, "", (answer, port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    if accepted:
        assert await resolve_target("hooks.example.com", 443, allow_private=level) == [answer]
    else:
        with pytest.raises(WebhookUrlRejected, match="resolves to"):
            await resolve_target("hooks.example.com", 443, allow_private=level)


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
        await resolve_target("mixed.example", 443, allow_private="loopback")


@pytest.mark.parametrize("value", ["yes", "1", "private", "on"])
def test_other_levels_are_a_configuration_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from gateway.settings import Settings

    monkeypatch.setenv("DSGW_WEBHOOK_ALLOW_PRIVATE", value)
    with pytest.raises(ValueError, match="DSGW_WEBHOOK_ALLOW_PRIVATE must be one of false, loopback, true"):
        Settings.from_env()
    monkeypatch.setenv("DSGW_WEBHOOK_ALLOW_PRIVATE", " LoopBack ")
    assert Settings.from_env().webhook_allow_private == "loopback"


def test_serve_refuses_a_bad_level_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    monkeypatch.setenv("DSGW_WEBHOOK_ALLOW_PRIVATE", "yes")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "dsgw: configuration error: DSGW_WEBHOOK_ALLOW_PRIVATE must be one of false, loopback, true (got 'yes')"
    ]
