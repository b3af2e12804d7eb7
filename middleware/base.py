"""The contracts between the gateway and its middlewares (DESIGN §4, §8).

Everything a middleware shares with the rest of the chain is declared here, on the
consumer's side: typed request keys, the per-request :class:`Outcome` that becomes the
access-log line, and :func:`add_response_headers`, the one way for a middleware to put
headers on a response that may be streamed (a proxied body, a cache hit, a problem).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

from aiohttp import web

__all__ = (
    "BODY_TAP",
    "CLAIMS",
    "CLIENT_IP",
    "OUTCOME",
    "REQUEST_ID",
    "AddToSet",
    "BodyTap",
    "Change",
    "Handler",
    "IPNetwork",
    "Middleware",
    "Outcome",
    "Put",
    "Quota",
    "ReadsNow",
    "Remove",
    "Store",
    "StoreUnavailable",
    "add_response_headers",
    "install",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in by whoever knows; written once as the access-log line.
    Also holds the fields the middlewares want on its response (:func:`add_response_headers`)."""

    service: str | None = None
    route: str | None = None
    upstream: str | None = None
    cache: str | None = None
    ratelimit_remaining: int | None = None
    sub: str | None = None
    error: str | None = None
    status: int | None = None  # set when the response's headers are sent; None means nothing sent yet
    response_headers: dict[str, str] = field(default_factory=dict)  # not logged


class Quota(NamedTuple):
    """The answer of :meth:`Store.take`: whether one request fits the budget, and what is left
    (a named tuple: one is made per limited request)."""

    allowed: bool
    remaining: int  # requests that would still be admitted right now, after this one
    reset_after: float  # seconds until the budget is full again
    retry_after: float  # seconds until one more request would be admitted; 0.0 when allowed


class Put(NamedTuple):
    """A change for :meth:`Store.write`: ``set(key, value, ttl=ttl)``."""

    key: str
    value: bytes
    ttl: float


class AddToSet(NamedTuple):
    """A change for :meth:`Store.write`: ``sadd(key, *members, ttl=ttl)``."""

    key: str
    members: tuple[str, ...]
    ttl: float


class Remove(NamedTuple):
    """A change for :meth:`Store.write`: ``delete(*keys)``."""

    keys: tuple[str, ...]


Change = Put | AddToSet | Remove


class StoreUnavailable(Exception):
    """The store could not be reached in time; the caller decides (on_error: allow, deny, local)."""


class Store(Protocol):
    """What rate limiting and caching need from a store (DESIGN §9), declared by its consumers
    and implemented by ``gateway/stores`` (memory, Redis, Redis Cluster). Keys are namespaced
    by the store. Every method raises :class:`StoreUnavailable` when the store cannot answer."""

    async def take(self, key: str, *, limit: int, period: float, spend: bool = True) -> Quota:
        """Spend one request of a ``limit`` per ``period`` seconds budget (GCRA), atomically;
        with ``spend=False`` only say what spending one would give (nothing is stored)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl: float) -> None: ...

    async def delete(self, *keys: str) -> int:
        """Remove ``keys``; return how many of them existed."""
        ...

    async def add(self, key: str, value: bytes, *, ttl: float) -> bool:
        """Store ``value`` only if ``key`` is absent (atomically); True when it was stored. A lock."""
        ...

    async def get_many(self, *keys: str) -> list[bytes | None]:
        """``get`` of several keys in one round trip (on a Cluster, give them one hash tag)."""
        ...

    async def add_and_get(self, key: str, value: bytes, *, ttl: float, then: str) -> tuple[bool, bytes | None]:
        """``add(key, value, ttl=ttl)``, then ``get(then)``, in one round trip: a lock taken, and
        a look at what it guards (on a Cluster, give both keys one hash tag)."""
        ...

    async def get_many_or_add(self, *keys: str, add: str, value: bytes, ttl: float) -> tuple[list[bytes | None], bool]:
        """``get_many(*keys)`` and, when the last of them is absent, ``add(add, value, ttl=ttl)``,
        in one atomic step and one round trip: what a lookup read, and whether it took the lock
        that guards filling the missing key (on a Cluster, give every key one hash tag)."""
        ...

    def write(self, *changes: Change) -> Awaitable[None]:
        """Apply ``changes`` in order, in one round trip (one after another on a Cluster). On
        one Redis they are one atomic step; when awaiting it raises StoreUnavailable (a Cluster,
        or an answer that never came), some of them may have been applied. (Declared a plain
        function giving an awaitable: a store may hand back its pending reply, with no
        coroutine frame of its own on the caller's wait; ``async def`` satisfies it too.)"""
        ...

    async def sadd(self, key: str, *members: str, ttl: float) -> None:
        """Add ``members`` to the set at ``key`` and make the set live ``ttl`` seconds from now."""
        ...

    async def smembers(self, key: str) -> frozenset[str]:
        """The members of the set at ``key`` (empty when absent)."""
        ...

    async def incr(self, key: str) -> int:
        """Add one to an integer (0 when absent) and return it: generation counters for purges."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable otherwise (for /readyz)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ReadsNow(Protocol):
    """A store that can also answer reads without awaiting (the memory store): the cache then
    serves fresh hits on the connection's own turn (``gateway.hit_lane``). A network store cannot."""

    def get_many_now(self, *keys: str) -> list[bytes | None]: ...


class BodyTap(Protocol):
    """What the endpoint feeds with the response it relays (Kong's body_filter; STYLE 2.6): the
    cache captures a miss while the client receives it, without buffering the client.

    The endpoint calls ``start`` once with the upstream's status, reason and headers (hop-by-hop
    removed, repeated ones kept, in order), ``feed`` with each body chunk as it is relayed, and
    ``finish(complete)`` at the end: False when the body broke off. A tap that is never finished
    saw an incomplete response (the client went away, or the upstream failed first).

    ``detached`` is True when nobody is listening (a background refresh): the endpoint then
    writes nothing to the client, reads the body only into the tap, and stops reading as soon as
    ``start`` or ``feed`` returns False (the tap wants no more).
    """

    detached: bool

    def start(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bool: ...

    def feed(self, chunk: bytes) -> bool: ...

    def finish(self, complete: bool) -> None: ...


REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)  # the client's address, honouring trusted_proxies
OUTCOME = web.RequestKey("outcome", Outcome)
CLAIMS = web.RequestKey("claims", dict[str, Any])  # verified JWT claims, when a token was verified
BODY_TAP = web.RequestKey("body_tap", BodyTap)  # set by the cache on a miss; fed by the endpoint


def add_response_headers(request: web.Request, headers: Mapping[str, str]) -> None:
    """Have ``headers`` set on whatever response this request gets, just before it is sent
    (kept on the request's :class:`Outcome`, which the request-id middleware makes first)."""
    request[OUTCOME].response_headers.update(headers)


async def _apply_response_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    outcome = request.get(OUTCOME)
    if outcome is not None:
        if outcome.response_headers:
            response.headers.update(outcome.response_headers)
        outcome.status = response.status


def install(app: web.Application) -> None:
    """Register the hook that applies :func:`add_response_headers` (call once per app)."""
    app.on_response_prepare.append(_apply_response_headers)


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A bounded memory of recent answers of a pure function (route matches, cache keys,
    decoded cache entries): when full it forgets everything and starts over, which costs
    nothing per lookup (unlike an LRU). Answers whose inputs are longer than ``max_size`` (by
    the caller's measure) are not kept, so no client can make the memory big; ``max_total``,
    when given, bounds the sum of those sizes too."""

    def __init__(self, *, entries: int = 4096, max_size: int = 2048, max_total: int | None = None) -> None:
        self._items: dict[K, V] = {}
        self._entries = entries
        self._max_size = max_size
        self._max_total = max_total
        self._total = 0

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def keep(self, key: K, value: V, size: int) -> None:
        """Remember ``value`` for ``key`` (whose inputs measure ``size``) if it is small enough."""
        if size > self._max_size:
            return
        if len(self._items) >= self._entries or (self._max_total is not None and self._total + size > self._max_total):
            self._items.clear()
            self._total = 0
        self._items[key] = value
        self._total += size
