"""gateway/auth.py without a server: glob rules, the `ds` claim, the verdict
cache (hit, expiry, bound), the keys file format, settings checks, and the
hook being absent when authentication is off."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway import auth
from gateway.auth import Authenticator, Scopes, compile_globs, hash_key, parse_keys_file
from gateway.http import StreamRequest
from gateway.protocol import ProblemError
from gateway.settings import Settings

SECRET = "s" * 32


def request(token: str | None, method: str = "GET") -> StreamRequest:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token is not None else []
    scope = {"type": "http", "method": method, "headers": headers, "path": "/v1/stream/x"}
    return StreamRequest(scope, None, "x")  # type: ignore[arg-type]


def token(ds: Any, ttl: float = 600, **claims: Any) -> str:
    return jwt.encode({"exp": time.time() + ttl, "ds": ds, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "pattern, name, matches",
    [
        ("chat/*", "chat/room-1", True),
        ("chat/*", "chat/", True),
        ("chat/*", "chat/room-1/x", False),
        ("chat/*", "chat", False),
        ("chat/**", "chat/room-1/x", True),
        ("chat/**", "chat/", True),
        ("**", "any/thing/at/all", True),
        ("*", "a/b", False),
        ("chat/room-?", "chat/room-1", False),  # ? is a literal
        ("chat/room-?", "chat/room-?", True),
        ("a.b", "axb", False),  # regex characters are literals
        ("a[1]", "a[1]", True),
        ("chat/*/msgs", "chat/r1/msgs", True),
        ("chat/*/msgs", "chat/r1/r2/msgs", False),
        ("chat/room-1", "chat/room-1", True),
        ("chat/room-1", "chat/room-10", False),  # whole names only
        ("sess-*", "sess-4\n2", True),  # * takes any character but '/', a newline included
    ],
)
def test_glob_rules(pattern: str, name: str, matches: bool) -> None:
    compiled = compile_globs([pattern])
    assert compiled is not None
    assert (compiled.fullmatch(name) is not None) is matches


def test_scopes_per_operation() -> None:
    scopes = Scopes.parse({"read": ["chat/room-1/*"], "append": ["chat/room-1/*"], "manage": ["chat/*"]})
    assert scopes.allows("read", "chat/room-1/a")
    assert scopes.allows("append", "chat/room-1/a")
    assert not scopes.allows("manage", "chat/room-1/a")
    assert scopes.allows("manage", "chat/room-1")
    assert not Scopes.parse(None).allows("read", "x")
    assert not Scopes.parse({"read": []}).allows("read", "x")
    assert Scopes.parse({"future-op": ["x"], "read": ["x"]}).allows("read", "x")


@pytest.mark.parametrize("claim", [["x"], "x", {"read": "x"}, {"read": [1]}, {"read": [""]}])
def test_malformed_ds_claim_is_refused(claim: Any) -> None:
    with pytest.raises(ValueError):
        Scopes.parse(claim)


async def test_malformed_ds_claim_is_a_401() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    with pytest.raises(ProblemError) as err:
        await a.grant(request(token({"read": "x"})))
    assert err.value.status == 401


async def test_verdict_is_cached_until_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    calls = 0
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(auth.jwt, "decode", counting)
    t = token({"read": ["x"]}, ttl=600)
    for _ in range(5):
        await a.authorize(request(t), "x")
    assert calls == 1
    # Past exp the cached verdict is dropped and the token verified again (401).
    now = time.time()
    monkeypatch.setattr(auth.time, "time", lambda: now + 601)
    with pytest.raises(ProblemError) as err:
        await a.authorize(request(t), "x")
    assert err.value.status == 401 and "expired" in err.value.detail
    assert t not in a._cache


async def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CACHE_MAX_ENTRIES", 3)
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    tokens = [token({"read": ["x"]}, n=i) for i in range(5)]
    for t in tokens:
        await a.grant(request(t))
    assert list(a._cache) == tokens[-3:]


async def test_scope_check_is_not_cached_across_streams() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    t = token({"read": ["a"]})
    await a.authorize(request(t), "a")
    with pytest.raises(ProblemError) as err:
        await a.authorize(request(t), "b")
    assert err.value.status == 403
    with pytest.raises(ProblemError) as err:
        await a.authorize(request(t, "POST"), "a")
    assert err.value.status == 403


async def test_grant_deadline_left_for_live_reads() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    r = request(token({"read": ["x"]}, ttl=100))
    await a.authorize(r, "x")
    assert 95 < r.scope[auth.SCOPE_DEADLINE] - time.monotonic() <= 100


async def test_leeway_applies_to_nbf_not_to_exp() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET, auth_leeway_s=10))
    await a.grant(request(token({"read": ["x"]}, nbf=int(time.time()) + 5)))
    with pytest.raises(ProblemError) as err:
        await a.grant(request(token({"read": ["x"]}, nbf=int(time.time()) + 60)))
    assert "not yet valid" in err.value.detail
    with pytest.raises(ProblemError) as err:
        await a.grant(request(token({"read": ["x"]}, ttl=-2)))
    assert "expired" in err.value.detail


async def test_token_without_exp_is_refused() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    t = jwt.encode({"ds": {"read": ["x"]}}, SECRET, algorithm="HS256")
    with pytest.raises(ProblemError) as err:
        await a.grant(request(t))
    assert err.value.status == 401 and "exp" in err.value.detail


async def test_oversized_token_is_refused_before_parsing() -> None:
    a = Authenticator(Settings(auth_jwt_secret=SECRET))
    with pytest.raises(ProblemError) as err:
        await a.grant(request("a." * 5000 + "b"))
    assert err.value.status == 401 and "too long" in err.value.detail
    assert not a._cache


def test_keys_file_format(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "ci", "sha256": hash_key("k1"), "ds": {"read": ["**"]}}]}))
    keys = parse_keys_file(str(path))
    grant = keys[hash_key("k1")]
    assert grant.subject == "key:ci" and grant.expires_at == math.inf
    assert grant.scopes.allows("read", "a/b") and not grant.scopes.allows("append", "a")
    for bad in ({"keys": [{"sha256": "xyz"}]}, [], {"keys": [{"sha256": hash_key("k"), "ds": []}]}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            parse_keys_file(str(path))


async def test_api_key_grant(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps({"keys": [{"name": "ci", "sha256": hash_key("dsk_1"), "ds": {"append": ["x"]}}]})
    )
    a = Authenticator(Settings(auth_keys_file=str(path)))
    await a.authorize(request("dsk_1", "POST"), "x")
    with pytest.raises(ProblemError) as err:
        await a.authorize(request("dsk_2", "POST"), "x")
    assert err.value.status == 401


def test_short_hs256_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(auth_jwt_secret="short")


def test_auth_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Settings.from_env().auth_enabled
    monkeypatch.setenv("DSGW_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("DSGW_AUTH_ISSUER", "https://i")
    monkeypatch.setenv("DSGW_RATE_APPENDS_PER_S", "5")
    s = Settings.from_env()
    assert s.auth_enabled and s.auth_issuer == "https://i" and s.rate_appends_per_s == 5


def test_off_by_default_means_no_hook() -> None:
    from gateway.ratelimit import request_guard

    class FakeGateway:
        settings = Settings()

    assert auth.authenticator(Settings()) is None
    assert request_guard(FakeGateway()) is None  # type: ignore[arg-type]


def test_rate_limit_identity_is_the_credential_else_the_client_address() -> None:
    from gateway.ratelimit import identity

    r = request(None)
    r.scope["client"] = ("10.1.2.3", 5555)
    assert identity(r) == "addr:10.1.2.3"
    r.scope[auth.SCOPE_GRANT] = auth.Grant("jwt:iss:alice", Scopes(), math.inf)
    assert identity(r) == "jwt:iss:alice"


def test_rate_keys_hide_the_identity() -> None:
    from gateway.keys import rate_key

    key = rate_key("key:ci", "appends")
    assert key.startswith("dsrl:{") and key.endswith("}:appends") and "ci" not in key
    assert rate_key("key:ci", "live") != key


# --- dsgw token ------------------------------------------------------------------------


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


async def test_dsgw_token_mints_what_the_gateway_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DSGW_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("DSGW_AUTH_ISSUER", "https://issuer")
    monkeypatch.setenv("DSGW_AUTH_AUDIENCE", "dsgw")
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "token",
        "--read",
        "chat/s-1",
        "--append",
        "chat/*",
        "--ttl",
        "30m",
        "--sub",
        "u1",
    )
    assert code == 0
    a = Authenticator(Settings.from_env())
    grant = await a.authorize(request(out.strip(), "POST"), "chat/s-2")
    assert grant.subject == "jwt:https://issuer:u1"
    assert 29 * 60 < grant.expires_at - time.time() <= 30 * 60
    await a.authorize(request(out.strip()), "chat/s-1")
    with pytest.raises(ProblemError):
        await a.authorize(request(out.strip()), "chat/s-2")


def test_dsgw_token_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DSGW_AUTH_JWT_SECRET", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "token", "--read", "x")
    assert code == 1 and err.strip() == "dsgw: DSGW_AUTH_JWT_SECRET is not set: no secret to sign with"
    monkeypatch.setenv("DSGW_AUTH_JWT_SECRET", SECRET)
    code, _, err = run_cli(monkeypatch, capsys, "token", "--read", "x", "--ttl", "soon")
    assert code == 1 and "not a duration" in err
    code, _, err = run_cli(monkeypatch, capsys, "token")
    assert code == 1 and "--read" in err


def test_dsgw_token_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "token", "--read", "a/**", "--api-key", "ci")
    assert code == 0
    entry = json.loads(err.split(": ", 1)[1])
    assert entry == {"name": "ci", "sha256": hash_key(out.strip()), "ds": {"read": ["a/**"]}}


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("45s", 45), ("30m", 1800), ("1h", 3600), ("7d", 604800)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert auth.parse_duration(text) == seconds


def test_make_run_summary_says_how_to_turn_auth_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from gateway.cli import _print_dev_summary

    state = SimpleNamespace(
        base_url="http://h:1", redis_url="redis://h:2/0", database_url="", worker_metrics={}
    )
    monkeypatch.delenv("DSGW_AUTH_JWT_SECRET", raising=False)
    _print_dev_summary(state, tmp_path, tmp_path / "dev.json")
    assert "auth:     off; turn on: DSGW_AUTH_JWT_SECRET=" in capsys.readouterr().out
    monkeypatch.setenv("DSGW_AUTH_JWT_SECRET", SECRET)
    _print_dev_summary(state, tmp_path, tmp_path / "dev.json")
    assert "auth:     on; a token: dsgw token" in capsys.readouterr().out


def test_check_config_never_prints_the_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import asyncio

    from gateway.cli_support import masked
    from gateway.configcheck import check

    monkeypatch.setenv("DSGW_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("DSGW_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    report = asyncio.run(check(masked))
    assert report["settings"]["gateway"]["auth_jwt_secret"] == "***"
    assert SECRET not in json.dumps(report, default=str)
