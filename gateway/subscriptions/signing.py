"""Webhook signing keys (Ed25519, published as a JWKS) and callback tokens (HS256),
shared by every replica through Redis.

Two key sets, each one Redis STRING holding a small JSON document (names in
gateway/keys.py)::

    dskeys:webhook-signing   Ed25519 private keys that sign webhook deliveries
    dskeys:callback-token    HMAC keys that sign callback / claim tokens

    {"v": 1, "keys": [{"kid": "...", "secret": "<base64url>", "created": <unix>, "active_from": <unix>}]}

The first replica that finds a set missing creates it with ``SET NX``; every
other replica (and every later start) loads the winner's keys, so all replicas
sign with the same key and verify each other's tokens. A key set is never
derived from configuration or regenerated per process (the reference server's
in-memory keys would make every replica publish a different JWKS).

Key ids: a signing key's ``kid`` is ``ds_`` + the base64url SHA-256 of its RFC
7638 JWK thumbprint input (derived from the key material, as PROTOCOL.md 6.5
recommends; receivers select the key by it); a token key's is ``tk_`` + random.

Rotation (`rotate_keys`, an operator action; rare): a new key is added with
``active_from = now + publish_ahead_s``. Until then every replica keeps signing
with the old key while already publishing the new public key, so by the time
the new key signs anything, every replica has reloaded the set (`KeyHolder`
reloads every ``refresh_s``, which must be shorter than ``publish_ahead_s``)
and every JWKS served lists it. A superseded key stays in the set (published,
and accepted for tokens) for ``keep_s`` after its successor became active:
longer than the receivers' replay window (5 minutes) plus a delivery's
lifetime for signing keys, longer than the longest token TTL for token keys.
The write is a compare-and-set (WATCH/MULTI on the one key), so two
concurrent rotations never lose a key.

Errors: `TokenInvalid` (code TOKEN_INVALID) and `TokenExpired` (TOKEN_EXPIRED),
both 401. Only expiry makes a well-signed token TOKEN_EXPIRED: a token stays
valid after its wake is done, so that a replayed callback reaches the fencing
check and answers 409 FENCED, as the protocol requires.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from redis.exceptions import WatchError

from .. import keys as rkeys

DOC_VERSION = 1
TOKEN_ALGORITHM = "HS256"
# Tokens are only ever accepted on the subscription callback/ack/release paths.
TOKEN_AUDIENCE = "dsgw:subscription"
# A longer bearer value is refused before any parsing.
MAX_TOKEN_BYTES = 4096
SIGNATURE_HEADER = re.compile(r"^t=(\d{1,12}),kid=([^,]{1,200}),ed25519=([A-Za-z0-9_-]{1,200})$")


class TokenError(Exception):
    """A callback token that is refused; `code` is the protocol's error code."""

    code = "TOKEN_INVALID"
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenInvalid(TokenError):
    code = "TOKEN_INVALID"


class TokenExpired(TokenError):
    code = "TOKEN_EXPIRED"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subscription_id: str
    wake_id: str
    generation: int
    expires_at: int


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str
    secret: bytes
    created: int
    active_from: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "secret": b64url(self.secret),
            "created": self.created,
            "active_from": self.active_from,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> StoredKey:
        return cls(
            str(item["kid"]), b64url_decode(item["secret"]), int(item["created"]), int(item["active_from"])
        )


@lru_cache(maxsize=16)  # a handful of keys, used for every delivery: parse each once
def _private_key(private: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(private)


@lru_cache(maxsize=16)
def _public_x(private: bytes) -> str:
    public = _private_key(private).public_key()
    return b64url(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def signing_kid(private: bytes) -> str:
    # RFC 7638: the required members in lexicographic order, no whitespace.
    thumbprint_input = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _public_x(private)}, separators=(",", ":"), sort_keys=True
    )
    return "ds_" + b64url(hashlib.sha256(thumbprint_input.encode()).digest())


def new_signing_key(now: int, active_from: int | None = None) -> StoredKey:
    private = Ed25519PrivateKey.generate().private_bytes_raw()
    return StoredKey(signing_kid(private), private, now, now if active_from is None else active_from)


def new_token_key(now: int, active_from: int | None = None) -> StoredKey:
    return StoredKey(
        "tk_" + secrets.token_hex(8),
        secrets.token_bytes(32),
        now,
        now if active_from is None else active_from,
    )


def _active(keyset: tuple[StoredKey, ...], now: int) -> StoredKey:
    """The newest key already active at `now` (the oldest if none is yet)."""
    ready = [k for k in keyset if k.active_from <= now]
    if not ready:
        return min(keyset, key=lambda k: k.active_from)
    return max(ready, key=lambda k: (k.active_from, k.created))


def _encode(keyset: list[StoredKey]) -> str:
    return json.dumps({"v": DOC_VERSION, "keys": [k.to_json() for k in keyset]}, separators=(",", ":"))


def _decode(raw: bytes | str) -> tuple[StoredKey, ...]:
    doc = json.loads(raw)
    if doc.get("v") != DOC_VERSION or not doc.get("keys"):
        raise ValueError("unrecognised key set document in Redis")
    return tuple(StoredKey.from_json(item) for item in doc["keys"])


@dataclass(frozen=True)
class Keys:
    """One snapshot of both key sets, as loaded from Redis."""

    signing: tuple[StoredKey, ...]
    tokens: tuple[StoredKey, ...]
    loaded_at: float = 0.0

    def signing_kid(self, now: int | None = None) -> str:
        """The kid that signs at `now`: the `webhook.signing.kid` of a subscription."""
        return _active(self.signing, int(time.time()) if now is None else now).kid

    def jwks(self) -> dict[str, Any]:
        """Every public signing key in the set (old ones stay until retired)."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": k.kid,
                    "x": _public_x(k.secret),
                }
                for k in self.signing
            ]
        }

    def signature_header(self, body: bytes, now: int) -> str:
        """`Webhook-Signature: t=<unix>,kid=<kid>,ed25519=<base64url over "<t>.<body>">`."""
        key = _active(self.signing, now)
        signature = _private_key(key.secret).sign(f"{now}.".encode() + body)
        return f"t={now},kid={key.kid},ed25519={b64url(signature)}"

    def issue_token(
        self, subscription_id: str, wake_id: str, generation: int, ttl_s: int, now: int | None = None
    ) -> str:
        """A bearer token for this wake's callback / ack / release (not a service JWT)."""
        issued = int(time.time()) if now is None else now
        key = _active(self.tokens, issued)
        claims = {
            "sub": subscription_id,
            "wid": wake_id,
            "gen": generation,
            "aud": TOKEN_AUDIENCE,
            "iat": issued,
            "exp": issued + ttl_s,
        }
        return jwt.encode(claims, key.secret, algorithm=TOKEN_ALGORITHM, headers={"kid": key.kid})

    def verify_token(self, token: str, subscription_id: str | None = None) -> TokenClaims:
        """The token's claims; raises TokenInvalid or TokenExpired. The caller
        still compares wake_id and generation with the current wake (FENCED)."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("token missing or too long")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise TokenInvalid("malformed token") from exc
        key = next((k for k in self.tokens if k.kid == kid), None)
        if key is None:
            raise TokenInvalid("token signed with an unknown key")
        try:
            # The signature is checked before any claim: a forged expired token is invalid.
            claims = jwt.decode(
                token,
                key.secret,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired("token expired") from exc
        except jwt.PyJWTError as exc:
            raise TokenInvalid("token refused") from exc
        sub, wid, gen = claims.get("sub"), claims.get("wid"), claims.get("gen")
        if not isinstance(sub, str) or not isinstance(wid, str) or type(gen) is not int:
            raise TokenInvalid("token claims malformed")
        if subscription_id is not None and sub != subscription_id:
            raise TokenInvalid("token belongs to another subscription")
        return TokenClaims(sub, wid, gen, int(claims["exp"]))


async def _load_or_create(redis: Any, key: str, fresh: StoredKey) -> tuple[StoredKey, ...]:
    # SET NX: of all replicas starting at once, exactly one key set wins and
    # everyone reads it back.
    for _ in range(3):
        raw = await redis.get(key)
        if raw is not None:
            return _decode(raw)
        await redis.set(key, _encode([fresh]), nx=True)
    raise RuntimeError(f"could not create or read {key}")


async def load_keys(redis: Any) -> Keys:
    """Both key sets, created in Redis on first use. `redis`: a redis.asyncio
    client (standalone or cluster); call again to pick up a rotation."""
    now = int(time.time())
    signing = await _load_or_create(redis, rkeys.WEBHOOK_SIGNING_KEYS, new_signing_key(now))
    tokens = await _load_or_create(redis, rkeys.CALLBACK_TOKEN_KEYS, new_token_key(now))
    return Keys(signing, tokens, time.monotonic())


class KeyHolder:
    """The current keys of one process, reloaded from Redis every `refresh_s`
    so a rotation reaches every replica before the new key signs."""

    def __init__(self, refresh_s: float = 60.0) -> None:
        self.refresh_s = refresh_s
        self._keys: Keys | None = None

    async def get(self, redis: Any) -> Keys:
        if self._keys is None or time.monotonic() - self._keys.loaded_at >= self.refresh_s:
            self._keys = await load_keys(redis)
        return self._keys


async def rotate_keys(
    redis: Any, which: str, *, now: int | None = None, publish_ahead_s: int = 300, keep_s: int = 3 * 3600
) -> StoredKey:
    """Add a key to set `which` ("signing" or "token") that starts signing
    `publish_ahead_s` from now, and drop keys superseded more than `keep_s` ago.
    Returns the new key (its kid). See the module docstring for the timing rules."""
    at = int(time.time()) if now is None else now
    key, fresh = {
        "signing": (rkeys.WEBHOOK_SIGNING_KEYS, new_signing_key(at, at + publish_ahead_s)),
        "token": (rkeys.CALLBACK_TOKEN_KEYS, new_token_key(at, at + publish_ahead_s)),
    }[which]
    while True:
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                current = list(_decode(raw)) if raw is not None else []
                keep = [k for k in current if not _superseded_before(k, current, at - keep_s)]
                pipe.multi()
                pipe.set(key, _encode([*keep, fresh]))
                await pipe.execute()
                return fresh
            except WatchError:
                continue


def _superseded_before(k: StoredKey, keyset: list[StoredKey], cutoff: int) -> bool:
    """Whether a newer key of the set was already active at `cutoff`."""
    return any(o.active_from > k.active_from and o.active_from <= cutoff for o in keyset)


def verify_signature_header(
    header: str, body: bytes, jwks: dict[str, Any], now: int, tolerance_s: int = 300
) -> bool:
    """What a receiver does (docs/subscriptions.md, "Webhooks: signatures"): pick
    the key by kid, check the timestamp is within the replay window, verify Ed25519."""
    match = SIGNATURE_HEADER.match(header or "")
    if not match:
        return False
    t, kid, signature = match.groups()
    if abs(now - int(t)) > tolerance_s:
        return False
    jwk = next((k for k in jwks.get("keys", []) if k.get("kid") == kid), None)
    if jwk is None or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return False
    try:
        public = Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
        public.verify(b64url_decode(signature), f"{t}.".encode() + body)
    except (InvalidSignature, ValueError):
        return False
    return True
