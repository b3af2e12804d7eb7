"""Verification keys for JWT auth (DESIGN §6): a static secret or PEM key, or a JWKS.

:class:`KeySource` answers one question for the auth middleware: which key verifies a
token whose header says ``alg`` and ``kid``. Every key carries the algorithms it may
verify: the configured allow-list intersected with the key's family (HMAC secret →
HS*, RSA → RS*/PS*, EC → the ES* of its curve, Ed25519/Ed448 → EdDSA). An HS256 token
can therefore never be checked against public-key bytes used as an HMAC secret, and a
JWKS never yields an HMAC key (``oct`` entries are ignored).

The JWKS is fetched with the app's own ``aiohttp.ClientSession`` (never pyjwt's blocking
``PyJWKClient``); each entry becomes a ``jwt.PyJWK``. It is kept for the response's
``Cache-Control: max-age`` (else ``jwks_cache``; a day at most), refreshed in the
background once it is stale (requests meanwhile use the stale keys), and refetched when a token names an unknown
``kid``. Whatever triggers it, a fetch starts at most once per ``jwks_cooldown`` and
concurrent callers share the one in flight, so a flood of made-up kids costs the JWKS
server nothing. A failed fetch keeps the last good key set (logged as a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
from aiohttp import hdrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .schema import ConfigError

if TYPE_CHECKING:
    from .auth import JwtSettings

__all__ = ("ASYMMETRIC_ALGORITHMS", "HMAC_ALGORITHMS", "KeySource", "UnknownKeyError", "VerificationKey")

logger = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS) | {"EdDSA"}

_MAX_JWKS_BYTES = 1024 * 1024
_MAX_CACHE = 86400.0  # a year-long max-age would keep a revoked key that long
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


class UnknownKeyError(jwt.InvalidTokenError):
    """No key is known for the token's ``kid`` (or the token has none and several keys fit)."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # bytes (HMAC) or a cryptography public key
    algorithms: tuple[str, ...]  # what this key may verify: allow-list ∩ the key's family
    weak: bool = False  # shorter than pyjwt recommends (already logged once; pyjwt's warning is muted)


def _key_algorithms(key: object) -> frozenset[str]:
    """The JWS algorithms a key of this type can verify (its family)."""
    if isinstance(key, bytes):
        return HMAC_ALGORITHMS
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset(alg for alg, curve in _EC_ALGORITHMS.items() if isinstance(key.curve, curve))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _verification_key(key: object, allowed: Iterable[str]) -> VerificationKey | None:
    algorithms = tuple(sorted(_key_algorithms(key).intersection(allowed)))
    if not algorithms:
        return None
    checks = jwt.get_algorithm_by_name  # module-level read-only lookup; no shared state is mutated
    weak = any(checks(alg).check_key_length(key) is not None for alg in algorithms)
    return VerificationKey(key, algorithms, weak)


class KeySource:
    """Resolves the verification key for a token header.

    Lifecycle: create it once per app with the app's ``ClientSession`` (required when
    ``jwks_url`` is set), ``await start()`` on startup (prefetches the JWKS; never fails
    the startup) and ``await aclose()`` on cleanup (cancels a fetch in flight; the session
    is the caller's to close). The constructor reads ``public_key`` from disk and raises
    :class:`ConfigError` (path ``jwt.public_key``) when it is unreadable or unusable.
    """

    def __init__(
        self,
        settings: JwtSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        fetch_timeout: float = 5.0,
    ) -> None:
        self._allowed = settings.algorithms
        self._secret = self._load_secret(settings.secret)
        self._public = self._load_public_key(settings.public_key) if settings.public_key else None
        self._url = settings.jwks_url
        if self._url is not None and session is None:
            raise TypeError("a jwks_url needs a ClientSession to fetch it with")
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._cache_for = settings.jwks_cache
        self._cooldown = settings.jwks_cooldown
        self._jwks: dict[str | None, VerificationKey] = {}  # kid → key; None for keys without a kid
        self._fresh_until = float("-inf")
        self._next_fetch = float("-inf")  # no fetch starts before this (the cooldown)
        self._fetching: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the JWKS once so the first requests need not wait (a failure is only logged)."""
        if self._url is not None:
            await self._refresh(wait=True)

    async def aclose(self) -> None:
        task, self._fetching = self._fetching, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- lookup ---------------------------------------------------------------------

    async def resolve(self, algorithm: str, kid: str | None) -> VerificationKey:
        """The key for a token signed with ``algorithm`` (already on the allow-list) and ``kid``.

        Raises ``jwt.InvalidAlgorithmError`` when no configured key may verify
        ``algorithm`` and :class:`UnknownKeyError` when the JWKS has no such ``kid``.
        """
        if algorithm in HMAC_ALGORITHMS:
            key = self._secret
        elif self._url is not None:
            key = await self._from_jwks(kid)
        else:
            key = self._public
        if key is None or algorithm not in key.algorithms:
            raise jwt.InvalidAlgorithmError("no configured key verifies this algorithm")
        return key

    async def _from_jwks(self, kid: str | None) -> VerificationKey:
        if self._clock() >= self._fresh_until:
            found = self._lookup(kid)
            await self._refresh(wait=found is None)  # stale but known: use it, refresh behind
        found = self._lookup(kid)
        if found is None:
            await self._refresh(wait=True)  # rotation: at most once per cooldown, shared
            found = self._lookup(kid)
        if found is None:
            raise UnknownKeyError("no key for the token's kid")
        return found

    def _lookup(self, kid: str | None) -> VerificationKey | None:
        if kid is not None:
            return self._jwks.get(kid)
        keys = list(self._jwks.values())
        return keys[0] if len(keys) == 1 else None  # no kid: only unambiguous with one key

    # -- fetching -------------------------------------------------------------------

    async def _refresh(self, *, wait: bool) -> None:
        """Start a fetch unless one is in flight or the cooldown forbids it; optionally wait for it."""
        if self._fetching is None:
            now = self._clock()
            if now < self._next_fetch:
                return
            self._next_fetch = now + self._cooldown
            self._fetching = asyncio.create_task(self._fetch())
        if wait:
            await asyncio.shield(self._fetching)  # a cancelled request must not cancel the others' fetch

    async def _fetch(self) -> None:
        assert self._session is not None and self._url is not None  # checked in __init__
        try:
            async with self._session.get(self._url, timeout=self._timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await _read_bounded(response.content)
                max_age = _max_age(response.headers.get(hdrs.CACHE_CONTROL, ""))
            keys = self._parse_jwks(json.loads(body))
        except Exception as exc:  # down, slow, or garbage: keep what we had
            logger.warning(
                "JWKS fetch from %s failed (%s: %s); keeping the last %d keys",
                self._url, type(exc).__name__, exc, len(self._jwks),
            )  # fmt: skip
        else:
            self._jwks = keys
            self._fresh_until = self._clock() + min(self._cache_for if max_age is None else max_age, _MAX_CACHE)
        finally:
            self._fetching = None

    def _parse_jwks(self, document: object) -> dict[str | None, VerificationKey]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK set")
        keys: dict[str | None, VerificationKey] = {}
        for data in document["keys"]:
            if not _is_public_signing_jwk(data):
                continue
            try:
                # The JWK's own `alg`, else pyjwt's guess from kty/crv (which knows Ed25519 but not Ed448).
                jwk = jwt.PyJWK.from_dict(data, "EdDSA" if data["kty"] == "OKP" and "alg" not in data else None)
            except jwt.PyJWTError:
                continue  # an unsupported key type or curve: skip it, as PyJWKSet does
            key = _verification_key(jwk.key, self._allowed & {jwk.algorithm_name} if "alg" in data else self._allowed)
            if key is None:
                continue
            if key.weak:
                logger.warning("JWKS key %r is shorter than recommended for %s", jwk.key_id, ", ".join(key.algorithms))
            keys[jwk.key_id] = key
        if not keys:
            raise ValueError(f"no key usable with {', '.join(sorted(self._allowed))}")
        return keys

    # -- static keys ----------------------------------------------------------------

    def _load_secret(self, secret: str | None) -> VerificationKey | None:
        if secret is None:
            return None
        key = _verification_key(secret.encode(), self._allowed)
        if key is not None and key.weak:
            logger.warning("jwt.secret is shorter than RFC 7518 requires for %s", ", ".join(key.algorithms))
        return key

    def _load_public_key(self, path: str) -> VerificationKey:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError("jwt.public_key", f"cannot read {path}: {exc.strerror}") from None
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                public: object = x509.load_pem_x509_certificate(pem).public_key()
            else:
                public = load_pem_public_key(pem)
        except ValueError:
            raise ConfigError("jwt.public_key", f"{path} is not a PEM public key or certificate") from None
        key = _verification_key(public, self._allowed)
        if key is None:
            raise ConfigError(
                "jwt.public_key", f"{path} holds a {type(public).__name__} that verifies none of the allowed algorithms"
            )
        if key.weak:
            logger.warning("jwt.public_key %s is shorter than recommended", path)
        return key


async def _read_bounded(stream: aiohttp.StreamReader) -> bytes:
    body = bytearray()
    while chunk := await stream.read(65536):
        body += chunk
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS larger than 1 MiB")
    return bytes(body)


def _is_public_signing_jwk(jwk: object) -> bool:
    return (
        isinstance(jwk, dict)
        and jwk.get("kty") in ("RSA", "EC", "OKP")  # never "oct": a JWKS must not hand out HMAC keys
        and jwk.get("use", "sig") == "sig"
        and "d" not in jwk  # a private key published by mistake
        and isinstance(jwk.get("kid", ""), str)
    )


def _max_age(cache_control: str) -> float | None:
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None
