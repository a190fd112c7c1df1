"""Bearer authentication and stream-scoped authorization (issue 10).

Off unless a credential source is configured (DSGW_AUTH_JWT_SECRET,
DSGW_AUTH_JWKS or DSGW_AUTH_KEYS_FILE); then every /v1/stream/ request needs
`Authorization: Bearer <token>`, where the token is a JWT (HS256 with the shared
secret; RS256, ES256 or EdDSA with a key from the JWKS) or a static API key
from the keys file. Its `ds` claim (or the key's `ds` entry) lists stream-name
globs per operation:

    {"ds": {"read": ["chat/room-1/*"], "append": ["chat/room-1/*"], "manage": ["chat/*"]}}

Globs: `*` matches any run of characters except `/` (so `chat/*` covers
`chat/room-1` but not `chat/room-1/x`), `**` matches any run including `/`
(`chat/**` covers both), every other character matches itself.

Verifying a token costs tens of microseconds: a verdict (the grant) is cached
by the raw token until the token's `exp`, so an append pays a dict lookup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import jwt

from .http import StreamRequest
from .protocol import ProblemError
from .settings import Settings

log = logging.getLogger("dsgw.auth")

OPERATIONS = ("read", "append", "manage")
# GET (catch-up, long-poll, SSE) and HEAD read; POST appends (and closes);
# PUT creates or forks, DELETE removes: both manage.
METHOD_OPERATION = {"GET": "read", "HEAD": "read", "POST": "append", "PUT": "manage", "DELETE": "manage"}
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256", "EdDSA")

# Where a request's grant and its expiry (a time.monotonic() deadline) are left
# in the ASGI scope for the live reads (gateway/reads.py) and the rate limits.
SCOPE_GRANT = "dsgw.auth.grant"
SCOPE_DEADLINE = "dsgw.auth.deadline"

# Bounds: the verdict cache (oldest verdict dropped first) and the token size
# (a longer header is refused before any parsing or hashing).
CACHE_MAX_ENTRIES = 10_000
MAX_TOKEN_BYTES = 8192
# A JWKS is fetched again at most this often for tokens naming an unknown kid,
# so a flood of made-up kids cannot turn into a flood of fetches.
JWKS_MIN_REFETCH_S = 10.0
KEYS_FILE_CHECK_S = 1.0
REALM = "ds-gateway"


# --- globs and scopes --------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    """The regex (unanchored) of one stream-name glob; see the module docstring."""
    parts = []
    for i, piece in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append("[^/]*".join(re.escape(p) for p in piece.split("*")))
    return "".join(parts)


def compile_globs(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{glob_regex(p)})" for p in patterns), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Scopes:
    """The streams a credential may use, per operation."""

    read: re.Pattern[str] | None = None
    append: re.Pattern[str] | None = None
    manage: re.Pattern[str] | None = None

    def allows(self, operation: str, name: str) -> bool:
        pattern: re.Pattern[str] | None = getattr(self, operation)
        return pattern is not None and pattern.fullmatch(name) is not None

    @classmethod
    def parse(cls, claim: Any) -> Scopes:
        """From a `ds` claim; ValueError when it is not {op: [glob, ...]}."""
        if claim is None:
            return cls()
        if not isinstance(claim, dict):
            raise ValueError("the ds claim must be an object")
        compiled: dict[str, re.Pattern[str] | None] = {}
        for op, globs in claim.items():
            if op not in OPERATIONS:
                continue  # a newer issuer may grant operations we do not know
            if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
                raise ValueError(f"ds.{op} must be a list of non-empty globs")
            compiled[op] = compile_globs(globs)
        return cls(**compiled)


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified credential: who (for rate limits and logs), what, until when."""

    subject: str
    scopes: Scopes
    expires_at: float  # Unix time; inf for API keys


# --- problems ------------------------------------------------------------------------


def unauthorized(reason: str, error: str = "invalid_token") -> ProblemError:
    """401 with an RFC 6750 challenge. `reason` never contains the token."""
    challenge = f'Bearer realm="{REALM}", error="{error}", error_description="{reason}"'
    return ProblemError(401, "Unauthorized", reason, headers={"www-authenticate": challenge})


def forbidden(operation: str, name: str) -> ProblemError:
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{operation}"'
    return ProblemError(
        403, "Forbidden", f"the credential does not grant {operation} on {name!r}",
        headers={"www-authenticate": challenge},
    )  # fmt: skip


MISSING = "missing bearer token"
EXPIRED = "token expired"


# --- key sources -----------------------------------------------------------------------


@dataclass
class KeysFile:
    """DSGW_AUTH_KEYS_FILE: static API keys, stored as SHA-256 hashes, reloaded
    when the file changes. A file that fails to parse keeps the last good keys."""

    path: str
    keys: dict[str, Grant] = field(default_factory=dict)
    _stamp: tuple[int, int] | None = None
    _next_check: float = 0.0

    def changed(self, now: float) -> bool:
        """Reload if the file changed (checked at most once a second)."""
        if now < self._next_check:
            return False
        self._next_check = now + KEYS_FILE_CHECK_S
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error("API keys file unreadable: %s", exc)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.keys = parse_keys_file(self.path)
        except (OSError, ValueError) as exc:
            log.error("API keys file not reloaded, keeping the previous keys: %s", exc)
            return False
        log.info("API keys loaded", extra={"fields": {"keys": len(self.keys)}})
        return True


def parse_keys_file(path: str) -> dict[str, Grant]:
    """{"keys": [{"name": ..., "sha256": <hex of the key>, "ds": {...}}, ...]} -> hash: grant."""
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with a 'keys' list")
    keys: dict[str, Grant] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: keys[{i}] is not an object")
        digest = str(entry.get("sha256", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{path}: keys[{i}].sha256 must be 64 hex digits")
        name = str(entry.get("name") or digest[:12])
        try:
            scopes = Scopes.parse(entry.get("ds"))
        except ValueError as exc:
            raise ValueError(f"{path}: keys[{i}]: {exc}") from None
        keys[digest] = Grant(f"key:{name}", scopes, math.inf)
    return keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("latin-1")).hexdigest()


class Jwks:
    """DSGW_AUTH_JWKS: public keys from a file or an http(s) URL, fetched again
    every DSGW_AUTH_JWKS_REFRESH_S and when a token names an unknown kid."""

    def __init__(self, source: str, refresh_s: float) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.keys: list[jwt.PyJWK] = []
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()

    def _load(self) -> list[jwt.PyJWK]:
        if self.source.startswith(("http://", "https://")):
            with urllib.request.urlopen(self.source, timeout=5) as response:  # noqa: S310 (configured URL)
                raw = response.read(1 << 20)
        else:
            with open(self.source, "rb") as f:
                raw = f.read()
        doc = json.loads(raw)
        keys = []
        for jwk in doc.get("keys", []) if isinstance(doc, dict) else []:
            try:
                key = jwt.PyJWK(jwk)
            except jwt.PyJWTError as exc:
                log.warning("JWKS key skipped: %s", exc)
                continue
            if key.algorithm_name in ASYMMETRIC_ALGORITHMS:
                keys.append(key)
        return keys

    async def refresh(self, *, unknown_kid: bool = False) -> None:
        """Fetch if due (or, for an unknown kid, if not fetched in the last few seconds)."""
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < (JWKS_MIN_REFETCH_S if unknown_kid else self.refresh_s):
                return
            try:
                self.keys = await asyncio.to_thread(self._load)
            except (OSError, ValueError) as exc:
                log.error("JWKS not loaded, keeping the previous keys: %s", exc)
            self._fetched_at = time.monotonic()

    def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        return [k for k in self.keys if k.algorithm_name == alg and (kid is None or k.key_id == kid)]


# --- the authenticator -------------------------------------------------------------------


class Authenticator:
    """Turns an Authorization header into a Grant (401 otherwise) and checks
    the grant against a stream and operation (403 otherwise)."""

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.auth_jwt_secret.encode()
        self.issuer = settings.auth_issuer or None
        self.audience = settings.auth_audience or None
        self.leeway_s = settings.auth_leeway_s
        self.jwks = Jwks(settings.auth_jwks, settings.auth_jwks_refresh_s) if settings.auth_jwks else None
        self.keys_file = KeysFile(settings.auth_keys_file) if settings.auth_keys_file else None
        if self.keys_file is not None:
            self.keys_file.changed(time.monotonic())
        self._cache: dict[str, Grant] = {}

    async def authorize(self, request: StreamRequest, name: str) -> Grant:
        """The request's grant, checked for `name` and the request's operation."""
        grant = await self.grant(request)
        operation = METHOD_OPERATION.get(request.method)
        if operation is not None and not grant.scopes.allows(operation, name):
            raise forbidden(operation, name)
        scope = request.scope
        scope[SCOPE_GRANT] = grant
        if grant.expires_at != math.inf:
            scope[SCOPE_DEADLINE] = time.monotonic() + (grant.expires_at - time.time())
        return grant

    async def grant(self, request: StreamRequest) -> Grant:
        header = request.header(b"authorization")
        if not header:
            raise unauthorized(MISSING, "invalid_request")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("expected Authorization: Bearer <token>", "invalid_request")
        if self.keys_file is not None and self.keys_file.changed(time.monotonic()):
            self._cache.clear()  # a removed key must stop working at once
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthorized("invalid token: too long")
        grant = await self._verify(token)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            del self._cache[next(iter(self._cache))]  # the oldest verdict
        self._cache[token] = grant
        return grant

    async def _verify(self, token: str) -> Grant:
        if self.keys_file is not None:
            grant = self.keys_file.keys.get(hash_key(token))
            if grant is not None:
                return grant
        if token.count(".") != 2:
            raise unauthorized("invalid token: neither a JWT nor a known API key")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("invalid token: malformed") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if alg == "HS256" and self.secret:
            keys: list[Any] = [self.secret]
        elif alg in ASYMMETRIC_ALGORITHMS and self.jwks is not None:
            await self.jwks.refresh()
            found = self.jwks.candidates(kid, alg)
            if not found and kid is not None:
                await self.jwks.refresh(unknown_kid=True)
                found = self.jwks.candidates(kid, alg)
            if not found:
                raise unauthorized("invalid token: no key for its kid and alg")
            keys = [k.key for k in found]
        else:
            raise unauthorized(f"invalid token: algorithm {str(alg)[:16]!r} not accepted")
        claims = self._decode(token, keys, alg)
        # Leeway for nbf/iat (clocks of the issuer run ahead); exp is exact, so
        # "expired" means the same thing to the issuer, the cache and live reads.
        exp = claims["exp"]
        if exp <= time.time():
            raise unauthorized(EXPIRED)
        try:
            scopes = Scopes.parse(claims.get("ds"))
        except ValueError as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        subject = (
            f"jwt:{claims.get('iss', '')}:{claims['sub']}"
            if "sub" in claims
            else f"jwt:{hash_key(token)[:16]}"
        )
        return Grant(subject, scopes, float(exp))

    def _decode(self, token: str, keys: list[Any], alg: str) -> dict[str, Any]:
        last: Exception | None = None
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    issuer=self.issuer,
                    audience=self.audience,
                    leeway=self.leeway_s,
                    options={"require": ["exp"], "verify_aud": self.audience is not None},
                )
            except jwt.InvalidSignatureError as exc:
                last = exc  # maybe the next key with this kid (rotation)
            except jwt.ExpiredSignatureError:
                raise unauthorized(EXPIRED) from None
            except jwt.ImmatureSignatureError:
                raise unauthorized("token not yet valid") from None
            except jwt.InvalidIssuerError:
                raise unauthorized("invalid token: wrong issuer") from None
            except jwt.InvalidAudienceError:
                raise unauthorized("invalid token: wrong audience") from None
            except jwt.MissingRequiredClaimError as exc:
                raise unauthorized(f"invalid token: no {exc.claim} claim") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise unauthorized("invalid token: malformed") from None
        raise unauthorized("invalid token: bad signature") from last


def require(request: StreamRequest, operation: str, name: str) -> None:
    """A second check on the same request (a fork also reads its source)."""
    grant: Grant | None = request.scope.get(SCOPE_GRANT)
    if grant is not None and not grant.scopes.allows(operation, name):
        raise forbidden(operation, name)


def authenticator(settings: Settings) -> Authenticator | None:
    """None when authentication is off: the request path then checks one attribute."""
    return Authenticator(settings) if settings.auth_enabled else None


# --- development tooling (`dsgw token`) ----------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90', '45s', '30m', '1h', '7d' -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 1h, 7d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def dev_token(settings: Settings, ds: dict[str, list[str]], ttl_s: int, subject: str) -> str:
    """An HS256 token signed with DSGW_AUTH_JWT_SECRET, carrying the
    configured issuer and audience, so this gateway accepts it."""
    if not settings.auth_jwt_secret:
        raise ValueError("DSGW_AUTH_JWT_SECRET is not set: no secret to sign with")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + ttl_s, "ds": ds}
    if settings.auth_issuer:
        claims["iss"] = settings.auth_issuer
    if settings.auth_audience:
        claims["aud"] = settings.auth_audience
    return jwt.encode(claims, settings.auth_jwt_secret, algorithm="HS256")


def new_api_key(name: str, ds: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    """A random API key and its entry for DSGW_AUTH_KEYS_FILE (which keeps only the hash)."""
    key = "dsk_" + secrets.token_urlsafe(32)
    return key, {"name": name, "sha256": hash_key(key), "ds": ds}
