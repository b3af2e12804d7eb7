"""JWT authentication and per-route authorisation (DESIGN §3, §5, §6).

The ``jwt:`` section (:class:`JwtSettings`, read once) and the per-route ``auth:`` /
``scopes:`` keys (:class:`AuthPolicy`), then :class:`JwtAuthMiddleware`, which verifies
the bearer token with keys from :class:`~middleware.jwks.KeySource` and leaves the
verified claims in ``request[CLAIMS]`` for rate-limit and cache keys. The proxy builds
the upstream claim headers with :func:`claim_headers` and strips client-sent copies of
:func:`claim_header_names` on every route.

What a client sees: no token where one is required → 401 ``Bearer realm="gateway"``; a
token that is present but bad in any way (also on ``auth: optional``) → 401 with
``error="invalid_token"``; a verified token without every route scope → 403 with
``error="insufficient_scope"``. Tokens are never logged nor echoed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import json
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import jwt
from aiohttp import hdrs, web
from jwt.types import Options
from jwt.warnings import InsecureKeyLengthWarning

from .base import CLAIMS, OUTCOME, Handler
from .jwks import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, KeySource, UnknownKeyError, VerificationKey
from .problem import Problem
from .schema import ConfigError, Section

__all__ = (
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "MAX_TOKEN_LENGTH",
    "QUERY_TOKEN",
    "AuthMode",
    "AuthPolicy",
    "JwtAuthMiddleware",
    "JwtSettings",
    "KeySource",
    "Rejected",
    "RejectedTokens",
    "Verified",
    "VerifiedTokens",
    "claim_header_names",
    "claim_headers",
    "token_scopes",
)

REALM = "gateway"
QUERY_TOKEN = "access_token"  # accepted on WebSocket upgrades only; the relay removes it before forwarding
MAX_TOKEN_LENGTH = 8192  # characters; anything longer is a 401 before any parsing
VERIFY_CACHE_ENTRIES = 1024  # default bound of the verified-token cache of one middleware (jwt.verify_cache)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6750 §3 scope-token


class AuthMode(enum.Enum):
    REQUIRED = "required"  # no valid token: 401
    OPTIONAL = "optional"  # no token: anonymous; an invalid token is still a 401
    NONE = "none"  # tokens are not looked at


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthPolicy:
    mode: AuthMode = AuthMode.REQUIRED
    scopes: frozenset[str] = frozenset()  # all required whenever a token is verified

    @classmethod
    def parse(cls, section: Section) -> AuthPolicy:
        """Read ``auth`` and ``scopes`` from a route's merged keys."""
        raw = section.raw("auth", "required")
        if raw is False or raw is None:
            raw = "none"  # YAML turns a bare `off`/`no` into false
        if not isinstance(raw, str) or raw not in {m.value for m in AuthMode}:
            raise section.error("auth", f"expected required, optional or none, got {raw!r}")
        scopes = section.text_list("scopes", ())
        return cls(mode=AuthMode(raw), scopes=frozenset(scopes))


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtSettings:
    algorithms: frozenset[str] = frozenset({"HS256"})  # allow-list; `none` is never accepted
    secret: str | None = field(default=None, repr=False)  # HMAC key (HS*)
    public_key: str | None = None  # path of a PEM public key file (RS*/PS*/ES*/EdDSA)
    jwks_url: str | None = None  # JWKS endpoint (RS*/PS*/ES*/EdDSA)
    issuer: str | None = None  # checked against `iss` when set
    audience: tuple[str, ...] = ()  # one of them must be in `aud` when set
    leeway: float = 0.0  # seconds of clock skew allowed on exp/nbf/iat
    claims_headers: tuple[tuple[str, str], ...] = ()  # (claim, upstream header) pairs
    jwks_cache: float = 300.0  # seconds a JWKS is kept when the response has no max-age
    jwks_cooldown: float = 30.0  # at least this long between refetches triggered by an unknown kid
    verify_cache: int = VERIFY_CACHE_ENTRIES  # verified tokens remembered (VerifiedTokens); 0 turns it off

    @classmethod
    def parse(cls, section: Section) -> JwtSettings:
        algorithms = section.text_list("algorithms", ("HS256",))
        for algorithm in algorithms:
            if algorithm.lower() == "none":
                raise section.error("algorithms", "`none` is never accepted")
            if algorithm not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                raise section.error("algorithms", f"unsupported algorithm {algorithm!r}")
        secret = section.optional_text("secret")
        public_key = section.optional_text("public_key")
        jwks_url = section.optional_text("jwks_url")
        if public_key and jwks_url:
            raise section.error("jwks_url", "set public_key or jwks_url, not both")
        hmac = {a for a in algorithms if a in HMAC_ALGORITHMS}
        asymmetric = {a for a in algorithms if a in ASYMMETRIC_ALGORITHMS}
        if hmac and not secret:
            raise section.error("secret", f"{sorted(hmac)[0]} needs a secret")
        if asymmetric and not (public_key or jwks_url):
            raise section.error("public_key", f"{sorted(asymmetric)[0]} needs public_key or jwks_url")
        if secret and not hmac:
            raise section.error("secret", "a secret is only used by HS256/HS384/HS512; add one to algorithms")
        if (public_key or jwks_url) and not asymmetric:
            raise section.error(
                "public_key" if public_key else "jwks_url", "a public key needs an RS*, PS*, ES* or EdDSA algorithm"
            )
        if jwks_url and not jwks_url.startswith(("https://", "http://")):
            raise section.error("jwks_url", "expected an http(s) URL")
        audience = section.text_list("audience", ())
        claims_headers = cls._claims_headers(section)
        settings = cls(
            algorithms=frozenset(algorithms),
            secret=secret,
            public_key=public_key,
            jwks_url=jwks_url,
            issuer=section.optional_text("issuer"),
            audience=audience,
            leeway=section.duration("leeway", 0.0),
            claims_headers=claims_headers,
            jwks_cache=section.duration("jwks_cache", 300.0),
            jwks_cooldown=section.duration("jwks_cooldown", 30.0),
            verify_cache=section.integer("verify_cache", VERIFY_CACHE_ENTRIES, minimum=0),
        )
        section.done()
        return settings

    @staticmethod
    def _claims_headers(section: Section) -> tuple[tuple[str, str], ...]:
        raw = section.raw("claims_headers", {})
        if not isinstance(raw, dict):
            raise section.error("claims_headers", "expected a mapping of claim: Header-Name")
        pairs = []
        for claim, header in raw.items():
            if not isinstance(header, str) or not _HEADER_NAME.match(header):
                raise ConfigError(f"{section.path_of('claims_headers')}.{claim}", "expected a header name")
            pairs.append((str(claim), header))
        return tuple(pairs)


# -- the verified-token cache -------------------------------------------------------------

_CACHEABLE_TOKEN_LENGTH = 4096  # characters; longer (rare) tokens are verified every time, bounding memory


@dataclass(frozen=True, slots=True)
class Verified:
    """A token that verified: its claims, and the header and key the signature was checked with."""

    claims: dict[str, Any]
    algorithm: str
    kid: str | None
    key: VerificationKey


E = TypeVar("E")


class _TokenMemory(Generic[E]):
    """An LRU of at most ``max_entries`` entries keyed by the raw token string (tokens over
    4096 characters are not kept): what :class:`VerifiedTokens` and :class:`RejectedTokens` share."""

    def __init__(self, max_entries: int, max_age: float, clock: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._max_age = max_age
        self._clock = clock
        self._entries: OrderedDict[str, E] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _keep(self, token: str, entry: E) -> None:
        if len(token) > _CACHEABLE_TOKEN_LENGTH:
            return
        self._entries[token] = entry
        self._entries.move_to_end(token)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class VerifiedTokens(_TokenMemory[tuple[Verified, float, float]]):  # token -> (what verified, valid from, until)
    """Tokens that verified, so a client's next request skips parsing and the signature check.

    An LRU of at most ``max_entries`` tokens, keyed by the raw token string (only
    successes: refused tokens go to a :class:`RejectedTokens` of their own, so a garbage or
    forged token cannot evict anything here). An entry is served only while the token
    would still pass pyjwt's time checks with the same ``leeway`` (``now < exp + leeway``
    and ``now >= max(nbf, iat) - leeway``; ``clock`` is wall time, as pyjwt's) and for at
    most ``max_age`` seconds. The middleware also uses a hit only while its
    :class:`KeySource` still resolves the token's ``alg``/``kid`` to the very key that
    verified it, so a key rotated out of the JWKS stops its tokens at once, as without
    the cache. The rest a verification depends on (allow-list, ``iss``, ``aud``) is fixed
    for the middleware that owns the cache; a config reload builds new ones.
    """

    def __init__(self, max_entries: int = VERIFY_CACHE_ENTRIES, *, max_age: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        super().__init__(max_entries, max_age, clock)

    def get(self, token: str) -> Verified | None:
        """What verified ``token``, or None: unknown, or no longer valid. The entry itself, shared
        with every later hit: copy its claims before changing them."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        verified, not_before, until = entry
        if not not_before <= self._clock() < until:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return verified

    def put(self, token: str, verified: Verified, leeway: float) -> None:
        """Remember ``verified``, just checked for ``token`` with ``leeway`` seconds of clock skew."""
        now = self._clock()
        until = now + self._max_age
        claims = verified.claims
        exp, nbf, iat = (_number(claims.get(name)) for name in ("exp", "nbf", "iat"))
        if exp is not None:
            until = min(until, exp + leeway)  # pyjwt: expired once exp <= now - leeway
        starts = [value - leeway for value in (nbf, iat) if value is not None]
        not_before = max(starts, default=float("-inf"))  # pyjwt: immature while nbf/iat > now + leeway
        if not not_before <= now < until:
            return
        stored = Verified(dict(claims), verified.algorithm, verified.kid, verified.key)
        self._keep(token, (stored, not_before, until))  # both bounds already include the leeway


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a token failed, and with which key (``alg``, ``kid``, key; None: it failed before
    any key was looked up, e.g. malformed)."""

    description: str
    checked_with: tuple[str, str | None, VerificationKey] | None = None


class RejectedTokens(_TokenMemory[tuple[Rejected, float]]):  # token -> (why, kept until)
    """Tokens that failed for a reason that stays true, so a client that keeps sending an
    expired or forged token (a retry loop, a stale app) costs a lookup, not a full
    verification (about 280k instructions each with pyjwt 2.15, more than a proxied request).

    An LRU of at most ``max_entries`` tokens, separate from :class:`VerifiedTokens` (garbage
    only ever evicts garbage), an entry kept at most ``max_age`` seconds. Remembered: a
    malformed token, an algorithm off the allow-list, and what the signature and claim
    checks said with a key, which the middleware serves only while its :class:`KeySource`
    still gives that very key. Never remembered: a token not valid *yet* (``nbf``/``iat``),
    one whose key could not be found or fetched, and tokens over 4096 characters.
    """

    def __init__(self, max_entries: int = VERIFY_CACHE_ENTRIES, *, max_age: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        super().__init__(max_entries, max_age, clock)

    def get(self, token: str) -> Rejected | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return entry[0]

    def put(self, token: str, rejected: Rejected) -> None:
        self._keep(token, (rejected, self._clock() + self._max_age))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- the middleware ---------------------------------------------------------------------

_TOKEN_ERRORS = (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError)  # all garbage can raise


class _TokenTooLongError(jwt.DecodeError):
    pass


_NOT_REMEMBERED = (_TokenTooLongError, jwt.ImmatureSignatureError)  # cheap to tell again, or true only for now


# First match wins (subclasses before their bases). Fixed texts only: nothing from the token
# reaches a header, where a CR/LF or quote smuggled in a claim would break it.
_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (_TokenTooLongError, "the token is too long"),
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is not meant for this audience"),
    (jwt.InvalidIssuerError, "the token has the wrong issuer"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "the token signature does not verify"),
    (UnknownKeyError, "the token is signed with an unknown key"),
    (jwt.InvalidAlgorithmError, "the token algorithm is not accepted"),
    (jwt.DecodeError, "the token is malformed"),
)


_HEADER_SEGMENT = re.compile(r"[A-Za-z0-9_-]+={0,2}")  # base64url, as pyjwt accepts it (trailing '=' allowed)


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, read only to pick the verification key: pyjwt's decode checks
    the whole token again. (pyjwt's ``get_unverified_header`` decodes all three segments with
    a per-byte check in Python, about 130k instructions for a 124-character token: a third of
    verifying one.) Raises what pyjwt would for a header it refuses."""
    segment, dot, _ = token.partition(".")
    if not dot or not _HEADER_SEGMENT.fullmatch(segment):
        raise jwt.DecodeError("Invalid header segment")
    stripped = segment.rstrip("=")
    try:
        header = json.loads(base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise jwt.DecodeError(f"Invalid header: {exc}") from None
    if not isinstance(header, dict):
        raise jwt.DecodeError("Invalid header string: must be a json object")
    if "kid" in header and not isinstance(header["kid"], str):
        raise jwt.InvalidTokenError("Key ID header parameter must be a string")
    return header


def _describe(exc: BaseException) -> str:
    for kind, description in _DESCRIPTIONS:
        if isinstance(exc, kind):
            return description
    return "the token is invalid"


@web.middleware
class JwtAuthMiddleware:
    """Verify the bearer token and enforce the route's :class:`AuthPolicy` (DESIGN §6).

    The token comes from ``Authorization: Bearer`` and, when ``websocket`` is set and the
    request is a WebSocket upgrade, from ``?access_token=`` (never on other requests).
    On success ``request[CLAIMS]`` holds the verified claims and ``request[OUTCOME].sub``
    the subject. Verified tokens are remembered in ``verified`` and tokens that failed for
    good in ``rejected`` (each shared by whoever passes the same one; by default a
    :class:`VerifiedTokens` and a :class:`RejectedTokens` of ``settings.verify_cache``
    entries, or none when that is 0).
    """

    def __init__(
        self,
        policy: AuthPolicy,
        *,
        settings: JwtSettings,
        keys: KeySource,
        websocket: bool = False,
        verified: VerifiedTokens | None = None,
        rejected: RejectedTokens | None = None,
    ) -> None:
        self._policy = policy
        self._keys = keys
        if verified is None and settings.verify_cache > 0:
            verified = VerifiedTokens(settings.verify_cache)
        if rejected is None and settings.verify_cache > 0:
            rejected = RejectedTokens(settings.verify_cache)
        self._verified = verified
        self._rejected = rejected
        self._websocket = websocket
        self._algorithms = frozenset(a for a in settings.algorithms if a.lower() != "none")
        self._jwt = jwt.PyJWT()  # an instance, not pyjwt's module global
        self._issuer = settings.issuer
        self._audience = list(settings.audience) or None
        self._leeway = settings.leeway
        self._options: Options = {"verify_aud": bool(settings.audience)}  # aud is only checked when configured
        self._challenge = f'Bearer realm="{REALM}"'
        scope = " ".join(s for s in sorted(policy.scopes) if _SCOPE_TOKEN.match(s))
        self._scope_challenge = (
            f'{self._challenge}, error="insufficient_scope", '
            f'error_description="the token lacks a required scope"' + (f', scope="{scope}"' if scope else "")
        )

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        await self.access(request)
        return await handler(request)

    async def access(self, request: web.Request) -> None:
        """The middleware's whole work, done before the handler and nothing after it: returns when
        the request may go on (claims on ``request[CLAIMS]``), raises a 401/403 Problem when not.
        The gateway's route chain calls this, not :meth:`__call__` (see :class:`gateway.chain.AccessSteps`)."""
        if self._policy.mode is AuthMode.NONE:
            return
        token = self._token(request)
        if token is None:
            if self._policy.mode is AuthMode.REQUIRED:
                raise Problem(401, "A bearer token is required", headers={hdrs.WWW_AUTHENTICATE: self._challenge})
            return  # optional and absent: anonymous

        claims = await self._verify(token)
        request[CLAIMS] = claims
        outcome = request.get(OUTCOME)
        if outcome is not None and claims.get("sub") is not None:
            outcome.sub = str(claims["sub"])
        missing = self._policy.scopes - token_scopes(claims) if self._policy.scopes else None
        if missing:
            raise Problem(
                403,
                f"The token lacks the scope {', '.join(sorted(missing))}",
                headers={hdrs.WWW_AUTHENTICATE: self._scope_challenge},
            )

    def _token(self, request: web.Request) -> str | None:
        for value in request.headers.getall(hdrs.AUTHORIZATION, ()):
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
        if self._websocket and _is_websocket_upgrade(request):
            return request.query.get(QUERY_TOKEN)
        return None

    async def _verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or a 401 Problem whatever went wrong (the one place errors are mapped)."""
        if self._verified is not None and (hit := self._verified.get(token)) is not None:
            try:  # (not contextlib.suppress: this runs on every request with a token)
                if await self._keys.resolve(hit.algorithm, hit.kid) is hit.key:
                    return dict(hit.claims)  # the request's own copy: the remembered ones stay as verified
            except _TOKEN_ERRORS:
                pass  # a key that is gone now: verify in full, and fail there
        if self._rejected is not None and (seen := self._rejected.get(token)) is not None:
            if seen.checked_with is None or await self._still_gives(*seen.checked_with):
                raise self._invalid(seen.description)
        checked_with, resolving = None, False
        try:
            if len(token) > MAX_TOKEN_LENGTH:
                raise _TokenTooLongError("token too long")
            header = _unverified_header(token)
            algorithm = header.get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._algorithms:
                raise jwt.InvalidAlgorithmError("algorithm not allowed")
            kid = header.get("kid")
            resolving = True  # a key not found or not fetched now may be there later: never remembered
            key = await self._keys.resolve(algorithm, kid)
            resolving, checked_with = False, (algorithm, kid, key)
            claims = self._decode(token, key)
        except _TOKEN_ERRORS as exc:
            description = _describe(exc)
            if self._rejected is not None and not resolving and not isinstance(exc, _NOT_REMEMBERED):
                self._rejected.put(token, Rejected(description, checked_with))
            raise self._invalid(description) from None
        if self._verified is not None and (kid is None or isinstance(kid, str)):
            self._verified.put(token, Verified(claims, algorithm, kid, key), self._leeway)
        return claims

    async def _still_gives(self, algorithm: str, kid: str | None, key: VerificationKey) -> bool:
        """Whether the key source still gives ``key`` for ``algorithm`` and ``kid``."""
        try:
            return await self._keys.resolve(algorithm, kid) is key
        except _TOKEN_ERRORS:
            return False  # gone now (rotated out of the JWKS): verify in full

    def _invalid(self, description: str) -> Problem:
        return Problem(
            401,
            f"Invalid bearer token: {description}",
            headers={
                hdrs.WWW_AUTHENTICATE: f'{self._challenge}, error="invalid_token", error_description="{description}"'
            },
        )

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any]:
        with _key_length_warning_muted() if key.weak else contextlib.nullcontext():
            return self._jwt.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )


@contextlib.contextmanager
def _key_length_warning_muted() -> Iterator[None]:
    """pyjwt warns on every decode with a short key; KeySource already warned once, when it loaded it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        yield


def _is_websocket_upgrade(request: web.Request) -> bool:
    connection = request.headers.get(hdrs.CONNECTION, "")
    return (
        request.method == hdrs.METH_GET
        and request.headers.get(hdrs.UPGRADE, "").strip().lower() == "websocket"
        and any(part.strip().lower() == "upgrade" for part in connection.split(","))
    )


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """The scopes a token grants: ``scope`` (space-separated) and ``scp`` (a list, or a string as Azure sends)."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str))
    return frozenset(scopes)


# -- claim headers for the upstream (DESIGN §5) -----------------------------------------

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0/C1 controls (CR, LF, NUL, NEL...) and line separators


def claim_header_names(settings: JwtSettings) -> tuple[str, ...]:
    """The headers the proxy must remove from *every* client request, whatever the route's
    auth mode: only the gateway may set them, from a verified token (:func:`claim_headers`)."""
    return tuple(header for _, header in settings.claims_headers)


def claim_headers(settings: JwtSettings, claims: Mapping[str, Any] | None) -> dict[str, str]:
    """The upstream headers ``settings.claims_headers`` asks for, from verified ``claims``.

    ``None`` (no verified token) gives ``{}``. Strings pass as they are, numbers and
    booleans as JSON (``42``, ``true``), lists are joined by spaces (``scp`` →
    ``"a b"``), objects are JSON. Control characters (CR, LF, NUL, ...) are removed, and
    a claim that is absent, null or empty after that gives no header at all.
    """
    if not claims:
        return {}
    headers: dict[str, str] = {}
    for claim, header in settings.claims_headers:
        value = claims.get(claim)
        if isinstance(value, list | tuple):
            text = " ".join(_claim_text(item) for item in value if item is not None)
        else:
            text = "" if value is None else _claim_text(value)
        text = _UNSAFE.sub("", text).strip()
        if text:
            headers[header] = text
    return headers


def _claim_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)  # ASCII-only: escapes anything odd
