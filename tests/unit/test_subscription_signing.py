"""Webhook signing keys, JWKS and callback tokens (gateway/subscriptions/signing.py).

Key creation and rotation run against fakeredis (pure logic: SET NX, WATCH);
signatures are checked the way a receiver does, from the published JWKS only."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path

import fakeredis
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway import keys as rkeys
from gateway.subscriptions import signing
from gateway.subscriptions.signing import TokenExpired, TokenInvalid, load_keys, rotate_keys


def fresh_redis() -> fakeredis.FakeAsyncRedis:
    """An empty Redis of its own (another deployment)."""
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fresh_redis()


def unpad(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_signature_verifies_with_the_published_jwks_key(redis: fakeredis.FakeAsyncRedis) -> None:
    keys = await load_keys(redis)
    jwks = json.loads(json.dumps(keys.jwks()))  # what a receiver gets over HTTP
    body = b'{"subscription_id":"sub-1","wake_id":"w_1","generation":3}'
    now = int(time.time())
    header = keys.signature_header(body, now)

    t, kid, sig = (part.split("=", 1)[1] for part in header.split(","))
    assert t == str(now) and kid.startswith("ds_") and "=" not in sig
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    assert {k: jwk[k] for k in ("kty", "crv", "alg", "use")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
    }
    # Verified with the public key alone, over "<t>.<raw body>".
    Ed25519PublicKey.from_public_bytes(unpad(jwk["x"])).verify(unpad(sig), f"{t}.".encode() + body)
    assert signing.verify_signature_header(header, body, jwks, now)
    assert not signing.verify_signature_header(header, body + b" ", jwks, now)
    assert not signing.verify_signature_header(header, body, jwks, now + 301)  # outside the replay window
    assert not signing.verify_signature_header(header.replace(kid, "ds_other"), body, jwks, now)
    assert keys.signing_kid(now) == kid


async def test_kid_is_the_jwk_thumbprint(redis: fakeredis.FakeAsyncRedis) -> None:
    keys = await load_keys(redis)
    (jwk,) = keys.jwks()["keys"]
    # RFC 7638 thumbprint of an OKP key: {"crv","kty","x"} sorted, no whitespace.
    thumb = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]}, separators=(",", ":"))
    assert (
        jwk["kid"]
        == "ds_" + base64.urlsafe_b64encode(hashlib.sha256(thumb.encode()).digest()).rstrip(b"=").decode()
    )


async def test_two_loads_from_one_redis_give_the_same_keys(redis: fakeredis.FakeAsyncRedis) -> None:
    # Replicas starting at the same moment: exactly one key set wins.
    first, second, *rest = await asyncio.gather(*(load_keys(redis) for _ in range(5)))
    assert first.jwks() == second.jwks() and all(r.jwks() == first.jwks() for r in rest)
    assert first.signing_kid() == second.signing_kid()
    # A token issued by one replica verifies on another.
    token = first.issue_token("sub-1", "w_1", 7, ttl_s=60)
    assert second.verify_token(token, "sub-1").generation == 7
    # The signing key and the token key are separate keys.
    signing_raw = await redis.get(rkeys.WEBHOOK_SIGNING_KEYS)
    token_raw = await redis.get(rkeys.CALLBACK_TOKEN_KEYS)
    assert signing_raw and token_raw and signing_raw != token_raw


async def test_token_round_trip_and_claims(redis: fakeredis.FakeAsyncRedis) -> None:
    keys = await load_keys(redis)
    token = keys.issue_token("sub-1", "w_abc", 12, ttl_s=3600)
    claims = keys.verify_token(token, "sub-1")
    assert (claims.subscription_id, claims.wake_id, claims.generation) == ("sub-1", "w_abc", 12)
    assert claims.expires_at >= int(time.time()) + 3590


async def test_expired_token_is_token_expired(redis: fakeredis.FakeAsyncRedis) -> None:
    keys = await load_keys(redis)
    token = keys.issue_token("sub-1", "w_1", 1, ttl_s=10, now=int(time.time()) - 100)
    with pytest.raises(TokenExpired) as err:
        keys.verify_token(token, "sub-1")
    assert err.value.code == "TOKEN_EXPIRED" and err.value.status == 401


async def test_a_token_stays_valid_after_its_wake_so_a_replay_can_be_fenced(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    # Verification depends on the token alone, never on the wake still being current:
    # the caller compares wake_id / generation and answers FENCED.
    keys = await load_keys(redis)
    token = keys.issue_token("sub-1", "w_old", 4, ttl_s=60)
    again = await load_keys(redis)
    assert again.verify_token(token, "sub-1").wake_id == "w_old"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
        lambda t: "",
        lambda t: "not-a-token",
        lambda t: "x" * 5000,
        lambda t: t.split(".")[0] + "." + t.split(".")[1] + ".",  # signature removed
    ],
)
async def test_tampered_token_is_token_invalid(redis: fakeredis.FakeAsyncRedis, mangle) -> None:  # type: ignore[no-untyped-def]
    keys = await load_keys(redis)
    token = keys.issue_token("sub-1", "w_1", 1, ttl_s=60)
    with pytest.raises(TokenInvalid) as err:
        keys.verify_token(mangle(token), "sub-1")
    assert err.value.code == "TOKEN_INVALID"


async def test_tokens_from_elsewhere_are_token_invalid(redis: fakeredis.FakeAsyncRedis) -> None:
    keys = await load_keys(redis)
    other = await load_keys(fresh_redis())  # another deployment's keys
    with pytest.raises(TokenInvalid):
        keys.verify_token(other.issue_token("sub-1", "w_1", 1, ttl_s=60), "sub-1")
    # Another subscription's token.
    with pytest.raises(TokenInvalid):
        keys.verify_token(keys.issue_token("sub-2", "w_1", 1, ttl_s=60), "sub-1")
    # A forged token with the right kid but alg none, or an expired forgery: invalid, not expired.
    kid = jwt.get_unverified_header(keys.issue_token("s", "w", 1, ttl_s=60))["kid"]
    forged = jwt.encode(
        {"sub": "sub-1", "wid": "w", "gen": 1, "aud": signing.TOKEN_AUDIENCE, "exp": 1},
        b"x" * 32,
        algorithm="HS256",
        headers={"kid": kid},
    )
    with pytest.raises(TokenInvalid) as err:
        keys.verify_token(forged, "sub-1")
    assert not isinstance(err.value, TokenExpired)
    none_alg = jwt.encode(
        {"sub": "sub-1", "wid": "w", "gen": 1, "aud": signing.TOKEN_AUDIENCE, "exp": 2**40},
        None,
        algorithm="none",
        headers={"kid": kid},
    )
    with pytest.raises(TokenInvalid):
        keys.verify_token(none_alg, "sub-1")


async def test_rotation_publishes_first_then_signs_and_keeps_old_keys(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    now = int(time.time())
    old = await load_keys(redis)
    old_kid = old.signing_kid(now)
    old_token = old.issue_token("sub-1", "w_1", 1, ttl_s=3600)
    new = await rotate_keys(redis, "signing", now=now, publish_ahead_s=300)
    await rotate_keys(redis, "token", now=now, publish_ahead_s=300)
    keys = await load_keys(redis)
    kids = {k["kid"] for k in keys.jwks()["keys"]}
    assert kids == {old_kid, new.kid}
    # Until active_from the old key still signs; then the new one.
    assert keys.signing_kid(now + 10) == old_kid
    assert keys.signing_kid(now + 300) == new.kid
    assert f"kid={new.kid}," in keys.signature_header(b"{}", now + 301)
    # Tokens issued before the rotation still verify.
    assert keys.verify_token(old_token, "sub-1").wake_id == "w_1"
    # A later rotation, long after, retires the superseded key.
    newest = await rotate_keys(redis, "signing", now=now + 100_000, publish_ahead_s=300, keep_s=3600)
    kids = {k["kid"] for k in (await load_keys(redis)).jwks()["keys"]}
    assert kids == {new.kid, newest.kid}


async def test_key_holder_reloads_after_its_interval(redis: fakeredis.FakeAsyncRedis) -> None:
    holder = signing.KeyHolder(refresh_s=0)
    first = await holder.get(redis)
    added = await rotate_keys(redis, "signing")
    assert added.kid not in {k["kid"] for k in first.jwks()["keys"]}
    assert added.kid in {k["kid"] for k in (await holder.get(redis)).jwks()["keys"]}
    cached = signing.KeyHolder(refresh_s=3600)
    assert (await cached.get(redis)) is (await cached.get(redis))


async def test_the_readme_receiver_snippet_verifies_a_signature(redis: fakeredis.FakeAsyncRedis) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "subscriptions.md").read_text()
    section = doc[doc.index("## Webhooks: signatures") :]
    snippet = section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]
    namespace: dict[str, object] = {}
    exec(compile(snippet, "docs/subscriptions.md", "exec"), namespace)
    verify = namespace["verify"]

    keys = await load_keys(redis)
    jwks = json.loads(json.dumps(keys.jwks()))
    body = b'{"subscription_id":"sub-1","wake_id":"w_9"}'
    header = keys.signature_header(body, int(time.time()))
    assert verify(body, header, jwks)  # type: ignore[operator]
    assert not verify(body.replace(b"w_9", b"w_8"), header, jwks)  # type: ignore[operator]
    assert not verify(body, keys.signature_header(body, int(time.time()) - 600), jwks)  # type: ignore[operator]
    assert not verify(body, header, {"keys": []})  # type: ignore[operator]
