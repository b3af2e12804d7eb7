"""Per-route rate limiting (DESIGN §6): the ``rate_limit:`` section and its middleware.

The arithmetic (GCRA: what is left, when the budget refills) lives in ``Store.take`` so
the memory and Redis stores give identical answers; this module decides *whose* budget a
request spends and *what the client is told*:

- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (seconds until the budget is full
  again) and the IETF draft ``RateLimit-Policy`` / ``RateLimit`` fields on every response
  of a limited route — proxied, cached or an error alike — applied when it is prepared;
- a rejection is 429 problem+json with ``Retry-After``: the whole seconds after which a
  request is admitted again.

The key is ``ip`` (the client address, honouring ``trusted_proxies``), ``sub`` (the
verified token's subject), ``header:<Name>`` or ``claim:<name>``; a request that has no
such value (no token, no header) is counted by its client address instead, so leaving a
header out buys no extra budget.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .base import CLAIMS, CLIENT_IP, OUTCOME, Handler, Quota, Store, StoreUnavailable, add_response_headers
from .problem import Problem
from .schema import Section

__all__ = ("ON_ERROR", "SECTION", "RateLimitConfig", "RateLimitMiddleware", "client_key")

logger = logging.getLogger(__name__)

SECTION = "rate_limit"
ON_ERROR = ("allow", "deny", "local")  # store.on_error: what happens while the store is unreachable

LIMIT = "X-RateLimit-Limit"
REMAINING = "X-RateLimit-Remaining"
RESET = "X-RateLimit-Reset"
POLICY = "RateLimit-Policy"  # draft-ietf-httpapi-ratelimit-headers
RATELIMIT = "RateLimit"
_MAX_KEY_PART = 64  # longer header/claim values are hashed into the key
_WARN_EVERY = 10.0  # seconds between two "store unavailable" warnings of one route


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitConfig:
    requests: int  # budget per period; > 0
    per: float  # the period, in seconds ("1s", "1m" in YAML)
    key: str = "ip"  # ip | sub | header:<Name> | claim:<name>

    @classmethod
    def parse(cls, section: Section) -> RateLimitConfig | None:
        """Build from the route's ``rate_limit:`` section; None when it is ``off``."""
        if section.is_off():
            return None
        key = section.text("key", "ip")
        if key not in ("ip", "sub") and not (key.startswith(("header:", "claim:")) and key.partition(":")[2]):
            raise section.error("key", f"expected ip, sub, header:<Name> or claim:<name>, got {key!r}")
        config = cls(requests=section.positive_int("requests"), per=section.duration("per", positive=True), key=key)
        section.done()
        return config


def client_key(request: web.Request, spec: str) -> str:
    """Whose budget ``request`` spends under key ``spec``; the client address when it has no such value."""
    if spec == "ip":  # the default, and the most common
        return "ip:" + request[CLIENT_IP]
    value: object = None
    if spec == "sub":
        claims = request.get(CLAIMS)
        value = claims.get("sub") if claims else None
    elif spec.startswith("header:"):
        value = request.headers.get(spec[7:])
    elif spec.startswith("claim:"):
        claims = request.get(CLAIMS)
        value = claims.get(spec[6:]) if claims else None
    if value is None or value == "":
        return "ip:" + request[CLIENT_IP]
    text = str(value)
    if len(text) > _MAX_KEY_PART or not text.isprintable():
        text = "h:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{spec.partition(':')[0]}:{text}"


@web.middleware
class RateLimitMiddleware:
    """Spend one request of the route's budget for the caller; 429 when there is none left."""

    def __init__(
        self,
        config: RateLimitConfig,
        *,
        store: Store,
        scope: str,
        on_error: str = "allow",
        fallback: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}")
        if on_error == "local" and fallback is None:
            raise ValueError("on_error=local needs a fallback (in-process) store")
        self._config = config
        self._store = store
        self._fallback = fallback
        self._on_error = on_error
        self._prefix = f"rl:{scope}:"  # each route spends its own budgets
        self._name = f'"{scope}"'  # the policy's name in the IETF fields (an sf-string)
        self._policy = f"{self._name};q={config.requests};w={math.ceil(config.per)}"
        self._limit = str(config.requests)
        self._clock = clock
        self._warned_at = -math.inf

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        await self.access(request)
        return await handler(request)

    async def access(self, request: web.Request) -> None:
        """The middleware's whole work, done before the handler and nothing after it: spends one
        request of the budget and sets the response fields; raises a 429 (or, store down and
        ``on_error: deny``, a 503) Problem when the request may not go on. The gateway's route
        chain calls this, not :meth:`__call__` (see :class:`gateway.chain.AccessSteps`)."""
        key = self._prefix + client_key(request, self._config.key)
        quota: Quota | None
        try:  # the store awaited here, not in a helper: one frame less on the request's every await
            quota = await self._store.take(key, limit=self._config.requests, period=self._config.per)
        except StoreUnavailable as exc:
            quota = await self._unavailable(key, exc)
        if quota is None:  # store down and on_error: allow
            return
        reset = math.ceil(quota.reset_after)
        add_response_headers(
            request,
            {
                LIMIT: self._limit,
                REMAINING: str(quota.remaining),
                RESET: str(reset),
                POLICY: self._policy,
                RATELIMIT: f"{self._name};r={quota.remaining};t={reset}",
            },
        )
        request[OUTCOME].ratelimit_remaining = quota.remaining
        if not quota.allowed:
            retry = max(1, math.ceil(quota.retry_after))
            raise Problem(
                429,
                f"Rate limit exceeded: {self._config.requests} requests per {self._config.per:g}s; retry in {retry}s",
                headers={"Retry-After": str(retry)},
            )

    async def peek(self, request: web.Request) -> tuple[str, Quota]:
        """The budget key ``request`` would spend and what one more request would get; spends
        nothing (explain). Raises StoreUnavailable when the store cannot answer."""
        who = client_key(request, self._config.key)
        quota = await self._store.take(
            self._prefix + who, limit=self._config.requests, period=self._config.per, spend=False
        )
        return who, quota

    async def _unavailable(self, key: str, exc: StoreUnavailable) -> Quota | None:
        """What ``on_error`` makes of a store that did not answer: a 503, the in-process
        limiter's answer (``local``), or None (``allow``: the request goes through unlimited)."""
        self._warn(exc)
        if self._on_error == "deny":
            raise Problem(503, "The rate-limit store is unavailable", headers={"Retry-After": "1"}) from None
        if self._on_error == "local" and self._fallback is not None:
            return await self._fallback.take(key, limit=self._config.requests, period=self._config.per)
        return None

    def _warn(self, exc: StoreUnavailable) -> None:
        now = self._clock()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            logger.warning("rate-limit store unavailable (on_error: %s): %s", self._on_error, exc)
