"""HTTP response cache (DESIGN §6, §9): the ``cache:`` section, its middleware, and purging.

What a client sees on every response of a cached route:

- ``X-Cache: HIT|MISS|BYPASS|STALE`` and the RFC 9211 ``Cache-Status`` saying why
  (``gateway; hit; ttl=25``, ``gateway; fwd=miss; stored``, ``gateway; fwd=request; stored``
  for a ``no-cache`` revalidation, ``gateway; fwd=bypass; detail=authorization``…), plus ``Age``
  on anything served from the cache. ``request[OUTCOME].cache`` gets the X-Cache value.

The rules:

- GET and HEAD are looked up (HEAD is answered from the GET entry); only a GET fills the cache.
  Statuses come from the config. Never stored: ``Cache-Control: no-store``, ``private`` or
  ``no-cache`` responses, ``Set-Cookie``, ``Vary: *``, bodies over ``max_entry`` (also when that
  only shows mid-stream: a miss is streamed to the client while a :class:`~middleware.base.BodyTap`
  captures it, and stops capturing at the limit).
- Fresh for ``s-maxage``, else ``max-age``, else the configured ttl (``Expires`` is not read).
- Request ``Cache-Control: no-cache`` (or ``max-age=0``) goes upstream and stores the answer;
  request ``no-store`` bypasses the cache both ways.
- The key holds the URL (normalised path and raw query), the scheme and ``Host`` (and any
  ``X-Forwarded-Host/Proto`` or ``Forwarded``: the upstream is told them), the values of the request headers the
  URL's response named in ``Vary``, and, when a token was verified, its subject (unless
  ``shared: true``). No other request header reaches the key or the upstream's answer to others:
  a request whose ``Authorization`` was not verified (an ``auth: none`` route) is neither served
  from nor stored in the cache unless ``shared: true`` (RFC 9111 §3.5).
- A successful (2xx/3xx) POST, PUT, PATCH or DELETE bumps its path's generation: every cached
  variant of that path (all queries, subjects and Vary values) is gone for every instance.
- Concurrent misses on one key make one upstream request: in-process the others wait for the
  first; across instances sharing a Redis, the first takes a short lock and the others poll for
  its entry, bounded by ``lock_wait``, then go upstream themselves. A GET's lookup takes the lock
  in the same atomic step that finds the entry absent (``Store.get_many_or_add``), so a miss
  costs no round trip of its own for it.
- ``stale_while_revalidate``: a stale entry is served (STALE) while one background request
  refreshes it. ``stale_if_error``: a stale entry is served instead of a 5xx, a refused
  connection or a timeout.
- The store being down never fails a request: the cache is bypassed (``detail=store-unavailable``).

:func:`purge` removes entries by service, path prefix or ``Cache-Tag`` (for the admin API).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from ._cache_key import DecodedEntries, Entry, Keys, cache_control, freshness, tags_of, vary_of
from .base import (
    BODY_TAP,
    CLAIMS,
    OUTCOME,
    AddToSet,
    Change,
    Handler,
    Outcome,
    Put,
    ReadsNow,
    Recent,
    Remove,
    Store,
    StoreUnavailable,
    add_response_headers,
)
from .problem import Problem
from .schema import Section

__all__ = ("DEFAULT_STATUSES", "SECTION", "CacheConfig", "CacheMiddleware", "purge", "request_target")

logger = logging.getLogger(__name__)

SECTION = "cache"
DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 410})

X_CACHE = "X-Cache"
CACHE_STATUS = "Cache-Status"  # RFC 9211
CACHE_TAG = "Cache-Tag"
_NAME = "gateway"  # our name in Cache-Status
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Keyed always: the upstream learns the client's host and scheme from them (X-Forwarded-*),
# so an answer that reflects them can only reach clients that sent the same.
_KEYED = ("host", "x-forwarded-host", "x-forwarded-proto", "forwarded")
_NEVER_STORED = ("no-store", "private", "no-cache")  # response Cache-Control directives
_INDEX_TTL = 24 * 3600.0  # seconds the purge index outlives its latest entry, at least
_POLL = 0.05  # seconds between two looks for the entry another instance is filling

_Filled = tuple[Entry, str]  # an entry and its digest, for the misses that waited for it
Target = Callable[[web.Request], tuple[str, str | None]]
RequestHeaders = CIMultiDictProxy[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    ttl: float = 60.0  # seconds an entry is fresh when the upstream says nothing; "30s", "5m"
    max_entry: int = 1024 * 1024  # bytes; a larger body is passed through, never stored
    statuses: frozenset[int] = DEFAULT_STATUSES  # which response statuses may be stored
    shared: bool = False  # true: one entry for every caller, tokens or not (RFC 9111 §3.5)
    stale_while_revalidate: float = 0.0  # seconds a stale entry may be served while refreshing
    stale_if_error: float = 0.0  # seconds a stale entry may be served when the upstream fails

    @classmethod
    def parse(cls, section: Section) -> CacheConfig | None:
        """Build from the route's ``cache:`` section; None when it is ``off`` (the default)."""
        if section.is_off():
            return None
        statuses = DEFAULT_STATUSES
        if section.has("statuses"):
            raw = section.raw("statuses")
            if not isinstance(raw, list) or not all(isinstance(s, int) and 100 <= s <= 599 for s in raw):
                raise section.error("statuses", "expected a list of HTTP status codes")
            statuses = frozenset(raw)
        config = cls(
            ttl=section.duration("ttl", 60.0),
            max_entry=section.size("max_entry", 1024 * 1024),
            statuses=statuses,
            shared=section.boolean("shared", False),
            stale_while_revalidate=section.duration("stale_while_revalidate", 0.0),
            stale_if_error=section.duration("stale_if_error", 0.0),
        )
        section.done()
        return config


def request_target(request: web.Request) -> tuple[str, str | None]:
    """The request's path and raw query (None: no '?'); the gateway passes its normalised one."""
    path, mark, query = request.raw_path.partition("?")
    return path, query if mark else None


@dataclass(slots=True)
class _Lookup:
    path: str
    url: str
    subject: str | None
    generations: list[bytes | None]
    varying: list[str]  # the header names the URL's response varies on, as last stored
    digest: str
    entry: Entry | None
    lock: str | None = None  # the fill lock this request holds, until it is released
    fwd: str = "fwd=miss"  # the Cache-Status fwd= parameter, should it go upstream


class _Capture:
    """The cache's :class:`~middleware.base.BodyTap`: keeps the response while it fits and may be stored."""

    __slots__ = (
        "chunks",
        "complete",
        "config",
        "detached",
        "directives",
        "fields",
        "fresh",
        "fwd",
        "headers",
        "reason",
        "request",
        "size",
        "status",
        "storable",
        "varying",
    )

    # set by start(), which reads the headers once for _not_storable and for the entry
    status: int
    reason: str
    headers: list[tuple[str, str]]
    fields: CIMultiDict[str]
    directives: dict[str, str]  # Cache-Control
    varying: list[str] | None  # Vary (None: Vary: *)
    fresh: float  # seconds it is fresh (s-maxage, max-age or the configured ttl)

    def __init__(self, config: CacheConfig, request: web.Request | None, fwd: str = "fwd=miss") -> None:
        self.config = config
        self.request = request  # None when detached (a background refresh): no client to tell
        self.detached = request is None
        self.fwd = fwd  # the Cache-Status fwd= parameter the client is told
        self.chunks: list[bytes] = []
        self.size = 0
        self.storable = False
        self.complete = False

    def start(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bool:
        self.status, self.reason, self.headers = status, reason, list(headers)
        self.fields = fields = CIMultiDict(headers)
        self.directives = directives = cache_control(fields.getall(hdrs.CACHE_CONTROL, ()))
        self.varying = vary_of(fields.getall(hdrs.VARY)) if hdrs.VARY in fields else []
        self.fresh = freshness(directives, self.config.ttl)
        why = _not_storable(self)
        self.storable = why is None
        if self.request is not None:
            detail = "; stored" if why is None else f"; detail={why}"
            add_response_headers(self.request, {CACHE_STATUS: f"{_NAME}; {self.fwd}{detail}"})
        return self.storable

    def feed(self, chunk: bytes) -> bool:
        if self.storable:
            self.size += len(chunk)
            if self.size > self.config.max_entry:
                self.storable = False
                self.chunks.clear()
            else:
                self.chunks.append(chunk)
        return self.storable

    def finish(self, complete: bool) -> None:
        self.complete = complete


def _not_storable(response: _Capture) -> str | None:
    """Why a captured response may not be stored (a Cache-Status detail), or None when it may."""
    config = response.config
    if response.status not in config.statuses:
        return "status"
    directives = response.directives
    if directives:
        for name in _NEVER_STORED:
            if name in directives:
                return name
    headers = response.fields
    if hdrs.SET_COOKIE in headers:
        return "set-cookie"
    if response.varying is None:
        return "vary-star"
    length = headers.get(hdrs.CONTENT_LENGTH, "")
    if length.isdigit() and int(length) > config.max_entry:
        return "too-large"
    if response.fresh <= 0 and not (config.stale_while_revalidate or config.stale_if_error):
        return "max-age-0"
    return None


@web.middleware
class CacheMiddleware:
    """Answer GET/HEAD from the store when it can; capture what the upstream says when it cannot.

    ``scope`` is the service name (its entries are purged together). ``target`` gives the
    request's normalised path below the service and raw query (the gateway passes its
    routing's); ``clock`` is wall-clock time (Age must agree between instances);
    ``lock_wait`` bounds how long a miss waits for the same miss on another instance.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        store: Store,
        scope: str,
        target: Target = request_target,
        clock: Callable[[], float] = time.time,
        lock_wait: float = 5.0,
    ) -> None:
        self._config = config
        self._store = store
        self._keys = Keys(scope)
        self._target = target
        self._clock = clock
        self._lock_wait = lock_wait
        self._stale = max(config.stale_while_revalidate, config.stale_if_error)
        self._entries = DecodedEntries()
        self._reads_now = store if isinstance(store, ReadsNow) else None  # the memory store: fresh_hit
        self._lookup_keys: Recent[str, tuple[str, str, str]] = Recent()  # URL -> the keys its lookup reads
        self._path_keys: Recent[str, str] = Recent()  # path -> its generation's key
        self._digests: Recent[tuple[object, ...], str] = Recent()  # a lookup's inputs -> its entry digest
        # what lookups read last, to guess the entry key they will read next (see _lookup)
        self._service_generation: bytes | None = None
        self._path_generations: Recent[str, bytes | None] = Recent()  # path -> its generation
        self._varies: Recent[str, bytes | None] = Recent()  # URL -> the Vary names its responses had
        self._inflight: dict[str, asyncio.Future[_Filled | None]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return await self._unsafe(request, handler)
        headers = request.headers
        if hdrs.UPGRADE in headers:  # a WebSocket handshake is never an entry
            return await handler(request)
        claims = request.get(CLAIMS)
        if hdrs.AUTHORIZATION in headers and claims is None and not self._config.shared:
            return await self._bypass(request, handler, "authorization")
        directives = cache_control(headers.getall(hdrs.CACHE_CONTROL)) if hdrs.CACHE_CONTROL in headers else {}
        if "no-store" in directives:
            return await self._bypass(request, handler, "no-store")
        subject = None if self._config.shared or claims is None else _subject(claims)
        revalidate = "no-cache" in directives or directives.get("max-age") == "0"
        try:
            # a GET that finds no entry will fill it: its lookup takes the fill lock too (see _miss)
            lookup = await self._lookup(request, subject, lock=not revalidate and request.method == hdrs.METH_GET)
        except StoreUnavailable as exc:
            logger.debug("cache store unavailable: %s", exc)
            return await self._bypass(request, handler, "store-unavailable")
        if revalidate:
            lookup.fwd = "fwd=request"
            return await self._fetch(request, handler, lookup)
        entry = lookup.entry
        if entry is not None:
            age = entry.age_at(self._clock())
            if age < entry.fresh:
                return self._replay(request, entry, "HIT", f"hit; ttl={math.floor(entry.fresh - age)}")
            late = age - entry.fresh
            if late < self._config.stale_while_revalidate:
                self._refresh(request, handler, lookup)
                return self._replay(request, entry, "STALE", f"hit; ttl={-math.ceil(late)}; detail=revalidating")
            if late < self._config.stale_if_error:
                return await self._fetch_or_stale(request, handler, lookup, entry)
            lookup.fwd = "fwd=stale"
        return await self._miss(request, handler, lookup)

    # -- lookups -------------------------------------------------------------------------

    async def _lookup(self, request: web.Request, subject: str | None, *, lock: bool = False) -> _Lookup:
        """Read the generations, the URL's Vary names and the entry they lead to. The entry's key
        depends on the other three, so it is guessed from what they were last time (almost
        always still so) and read with them, in one round trip; a wrong guess costs a second.
        With ``lock``, an absent entry's fill lock is taken in that same step (``lookup.lock``)."""
        path, query = self._target(request)
        url = path if query is None else f"{path}?{query}"
        lookup_keys = self._lookup_keys_of(path, url)
        guess = [self._service_generation, self._path_generations.get(path), self._varies.get(url)]
        guessed = self._digest(request, url, subject, guess)
        keys = self._keys
        if lock:
            (*read, data), locked = await self._store.get_many_or_add(
                *lookup_keys, keys.entry(guessed), add=keys.lock(guessed), value=b"1", ttl=self._lock_wait
            )
        else:
            (*read, data), locked = await self._store.get_many(*lookup_keys, keys.entry(guessed)), False
        service_gen, path_gen, vary = read
        if read == guess:
            digest = guessed
        else:  # remember what was read for the next guess, and use it now
            self._service_generation = service_gen
            self._path_generations.keep(path, path_gen, len(path))
            self._varies.keep(url, vary, len(url))
            digest = self._digest(request, url, subject, read)
        lookup = _Lookup(path, url, subject, [service_gen, path_gen], _names(vary), digest, None)
        if digest != guessed:
            if locked:  # the lock of the key the guess led to: not this request's to hold
                await self._quietly(self._store.delete(keys.lock(guessed)))
            data = await self._store.get(keys.entry(digest))
        elif locked:
            lookup.lock = keys.lock(digest)  # released by the write that stores the entry, or by _miss
        lookup.entry = self._entries.decode(data) if data is not None else None
        return lookup

    def _lookup_keys_of(self, path: str, url: str) -> tuple[str, str, str]:
        """The keys a lookup of ``url`` reads first: both generations and the URL's Vary names."""
        lookup_keys = self._lookup_keys.get(url)
        if lookup_keys is None:  # two digests per URL, remembered for recent (short) URLs and paths
            keys = self._keys
            path_key = self._path_keys.get(path)
            if path_key is None:  # the URLs of one path (its queries) share this one
                path_key = keys.path_generation(path)
                self._path_keys.keep(path, path_key, len(path))
            lookup_keys = (keys.generation, path_key, keys.vary(url))
            self._lookup_keys.keep(url, lookup_keys, len(url))
        return lookup_keys

    def _digest(self, request: web.Request, url: str, subject: str | None, read: list[bytes | None]) -> str:
        """The entry digest for ``request`` given what a lookup read: both generations and the Vary names."""
        service_gen, path_gen, vary = read
        return self._digest_of(request.scheme, request.headers, [service_gen, path_gen], url, subject, _names(vary))

    def _digest_for(self, request: web.Request, lookup: _Lookup, varying: list[str]) -> str:
        """The digest of ``lookup``'s URL for ``request`` when its responses vary on ``varying``."""
        return self._digest_of(request.scheme, request.headers, lookup.generations, lookup.url, lookup.subject, varying)

    def _digest_of(
        self,
        scheme: str,
        headers: RequestHeaders,
        generations: list[bytes | None],
        url: str,
        subject: str | None,
        varying: list[str],
    ) -> str:
        values = [scheme]
        for name in _KEYED:  # only Host, as a rule: the others are left out when absent
            if name in headers:
                values.append(f"{name}:{', '.join(headers.getall(name))}")
        for name in varying:
            found = headers.getall(name, None)
            values.append(f"{name}:" if found is None else f"{name}:{', '.join(found)}")
        # the same inputs give the same digest: remembered for recent ones (a hash of the inputs
        # instead of a SHA-256 of them, on every hit)
        inputs = (*generations, url, subject, *values)
        digest = self._digests.get(inputs)
        if digest is None:
            digest = Keys.digest(generations, url, subject, values)
            self._digests.keep(inputs, digest, len(url) + sum(map(len, values)))
        return digest

    # -- answers -------------------------------------------------------------------------

    @property
    def answers_now(self) -> bool:
        """True when :meth:`fresh_hit` can answer (the store is read without awaiting)."""
        return self._reads_now is not None

    def fresh_hit(
        self, scheme: str, headers: RequestHeaders, path: str, query: str | None
    ) -> tuple[Entry, dict[str, str]] | None:
        """The fresh entry :meth:`__call__` would answer an anonymous GET with, and the headers it
        would add (X-Cache, Cache-Status, Age), read without awaiting: for the gateway's hit lane
        (:mod:`gateway.hit_lane`), on a route whose chain before the cache is empty.

        None whenever the full chain could do anything else, and the lane then passes the request
        on to it: the store cannot be read without awaiting (Redis), the request carries a header
        the cache acts on (``Authorization``, ``Cache-Control``, ``Upgrade``), the URL's responses
        vary on request headers, or there is no fresh entry (a miss, or a stale one to revalidate).
        """
        reads = self._reads_now
        if reads is None or hdrs.AUTHORIZATION in headers or hdrs.CACHE_CONTROL in headers or hdrs.UPGRADE in headers:
            return None
        url = path if query is None else f"{path}?{query}"
        service_gen, path_gen, vary = reads.get_many_now(*self._lookup_keys_of(path, url))
        if vary:
            return None
        digest = self._digest_of(scheme, headers, [service_gen, path_gen], url, None, [])
        (data,) = reads.get_many_now(self._keys.entry(digest))
        entry = self._entries.decode(data) if data is not None else None
        if entry is None:
            return None
        age = entry.age_at(self._clock())
        if age >= entry.fresh:
            return None
        ttl, seconds = math.floor(entry.fresh - age), math.floor(age)
        return entry, self._headers("HIT", f"hit; ttl={ttl}", {hdrs.AGE: str(seconds)})  # what _replay adds

    def _replay(self, request: web.Request, entry: Entry, result: str, status: str) -> web.Response:
        age = math.floor(entry.age_at(self._clock()))
        self._tell(request, result, status, {hdrs.AGE: str(age)})
        return web.Response(
            status=entry.status, reason=entry.reason or None, headers=CIMultiDict(entry.headers), body=entry.body
        )

    def _tell(self, request: web.Request, result: str, status: str, extra: dict[str, str] | None = None) -> None:
        add_response_headers(request, self._headers(result, status, extra))
        request[OUTCOME].cache = result

    @staticmethod
    def _headers(result: str, status: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {X_CACHE: result, CACHE_STATUS: f"{_NAME}; {status}", **(extra or {})}

    async def _bypass(self, request: web.Request, handler: Handler, why: str) -> web.StreamResponse:
        self._tell(request, "BYPASS", f"fwd=bypass; detail={why}")
        return await handler(request)

    async def _unsafe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Forward; a success invalidates every cached variant of the path."""
        self._tell(request, "BYPASS", "fwd=bypass; detail=method")
        response = await handler(request)
        if request.method in _UNSAFE and 200 <= response.status < 400:
            try:
                await self._store.incr(self._keys.path_generation(self._target(request)[0]))
            except StoreUnavailable as exc:
                logger.warning("cache: could not invalidate %s: %s", self._target(request)[0], exc)
        return response

    # -- misses --------------------------------------------------------------------------

    async def _miss(self, request: web.Request, handler: Handler, lookup: _Lookup) -> web.StreamResponse:
        """One upstream request per key: later misses wait for the first one's entry."""
        pending = self._inflight.get(lookup.digest)
        if pending is not None and lookup.lock is None:
            entry = self._usable(request, lookup, await self._wait(pending))
            if entry is not None:
                return self._replay(request, entry, "HIT", f"hit; ttl={self._ttl(entry)}; detail=coalesced")
            return await self._fetch(request, handler, lookup)
        if request.method != hdrs.METH_GET:
            return await self._fetch(request, handler, lookup)  # only a GET body can fill the entry
        # With a request of this process already waiting (its lookup, finished first, found the
        # lock taken: by this one), this one holds the lock and fills: the other sees the entry
        # once the lock is released, and its own waiters with it.
        future: asyncio.Future[_Filled | None] | None = None
        if pending is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[lookup.digest] = future
        lock = self._keys.lock(lookup.digest)
        try:
            # The lookup took the lock when it found no entry: fill it. Else (a stale entry, a
            # second read after a wrong guess) take it now and look once more, in one round trip:
            # a fill that ended meanwhile released the lock after storing. Without the lock,
            # another instance is filling the entry: wait for it.
            if lookup.lock is None:
                try:
                    locked, data = await self._store.add_and_get(
                        lock, b"1", ttl=self._lock_wait, then=self._keys.entry(lookup.digest)
                    )
                except StoreUnavailable:
                    locked, data = True, None  # nobody else can see the store either
                if locked:
                    lookup.lock = lock  # released by the write that stores the entry, or below
                entry = self._fresh(data) if locked else await self._poll(request, lookup)
                if entry is not None:
                    if future is not None:
                        future.set_result(self._filled(request, lookup, entry))
                    return self._replay(request, entry, "HIT", f"hit; ttl={self._ttl(entry)}; detail=coalesced")
            return await self._fetch(request, handler, lookup, future)
        finally:
            if future is not None:
                if not future.done():
                    future.set_result(None)
                del self._inflight[lookup.digest]
            if lookup.lock is not None:
                lookup.lock = None
                await self._quietly(self._store.delete(lock))

    async def _wait(self, pending: asyncio.Future[_Filled | None]) -> _Filled | None:
        try:
            async with asyncio.timeout(self._lock_wait):
                return await asyncio.shield(pending)
        except TimeoutError:
            return None

    def _filled(self, request: web.Request, lookup: _Lookup, entry: Entry) -> _Filled:
        """The entry a fill produced, with the key it has for the request that filled it."""
        return entry, self._digest_for(request, lookup, _varying(entry))

    def _usable(self, request: web.Request, lookup: _Lookup, filled: _Filled | None) -> Entry | None:
        """The entry another request filled, if this request has the same key for it (the same
        values of the headers it varies on, which the lookup may not have known) and it is fresh."""
        if filled is None:
            return None
        entry, digest = filled
        if digest != self._digest_for(request, lookup, _varying(entry)) or entry.age_at(self._clock()) >= entry.fresh:
            return None
        return entry

    def _fresh(self, data: bytes | None) -> Entry | None:
        entry = self._entries.decode(data) if data is not None else None
        return entry if entry is not None and entry.age_at(self._clock()) < entry.fresh else None

    async def _poll(self, request: web.Request, lookup: _Lookup) -> Entry | None:
        """Look for the entry another instance is filling, until its lock is gone or lock_wait."""
        deadline = self._clock() + self._lock_wait
        lock = self._keys.lock(lookup.digest)
        while self._clock() < deadline:
            await asyncio.sleep(_POLL)
            try:
                # The lock first: a fill stores its entry, then releases the lock, so once the
                # lock is seen gone the entry is there to find. Looked at the other way round,
                # a fill that ended between the two reads would look like one that stored nothing.
                released = await self._store.get(lock) is None
                again = await self._lookup(request, lookup.subject)
                if again.entry is not None:
                    return again.entry
                if released:
                    return None
            except StoreUnavailable:
                return None
        return None

    async def _fetch(
        self,
        request: web.Request,
        handler: Handler,
        lookup: _Lookup,
        future: asyncio.Future[_Filled | None] | None = None,
    ) -> web.StreamResponse:
        """Go upstream; a GET response is captured while it streams, and stored if it may be."""
        self._tell(request, "MISS", lookup.fwd)
        if request.method != hdrs.METH_GET:
            return await handler(request)
        tap = _Capture(self._config, request, lookup.fwd)
        request[BODY_TAP] = tap
        response = await handler(request)
        filled, stored = self._entry(request, lookup, tap)
        if stored is not None:
            try:  # awaited here, not in a helper: one frame less on the request's wait
                await stored
            except StoreUnavailable as exc:
                logger.debug("cache store unavailable while storing: %s", exc)
        if future is not None and not future.done():
            future.set_result(filled)
        return response

    async def _fetch_or_stale(
        self, request: web.Request, handler: Handler, lookup: _Lookup, stale: Entry
    ) -> web.StreamResponse:
        """stale_if_error: the upstream's answer, unless it fails; then the stale entry."""
        lookup.fwd = "fwd=stale"
        try:
            response = await self._miss(request, handler, lookup)
        except Problem as problem:
            if problem.status not in (502, 503, 504):
                raise
            failed = problem.status
        else:
            if response.prepared or response.status < 500:
                return response
            failed = response.status
        late = math.ceil(stale.age_at(self._clock()) - stale.fresh)
        return self._replay(request, stale, "STALE", f"fwd=stale; fwd-status={failed}; ttl={-late}; detail=error")

    def _entry(
        self, request: web.Request, lookup: _Lookup, tap: _Capture
    ) -> tuple[_Filled | None, Awaitable[None] | None]:
        """What the tap captured, if it was whole and may be stored: the entry and its digest
        (its key for ``request``, which the misses waiting for it compare theirs with), or None;
        and the store's write of it (with the release of the fill lock), to await, or None."""
        if not (tap.storable and tap.complete):
            return None, None
        headers = tap.fields
        age = headers.get(hdrs.AGE)  # the fields below are rarely there: looked for before they are parsed
        entry = Entry(
            status=tap.status,
            reason=tap.reason,
            headers=tap.headers if age is None else [(k, v) for k, v in tap.headers if k.lower() != "age"],
            body=b"".join(tap.chunks),
            stored=self._clock(),
            age=float(age) if age is not None and age.isdigit() else 0.0,
            fresh=tap.fresh,
            stale=self._stale,
            tags=tuple(tags_of(headers.getall(CACHE_TAG))) if CACHE_TAG in headers else (),
        )
        varying = tap.varying or []
        digest = lookup.digest if varying == lookup.varying else self._digest_for(request, lookup, varying)
        ttl = entry.fresh + entry.stale - entry.age
        if ttl <= 0:
            return (entry, digest), None
        keys, index_ttl = self._keys, max(ttl, _INDEX_TTL)
        changes: list[Change] = []
        if varying != lookup.varying:
            changes.append(Put(keys.vary(lookup.url), ",".join(varying).encode(), index_ttl))
        changes.append(Put(keys.entry(digest), entry.encode(), ttl))
        changes.append(AddToSet(keys.index, (f"{digest} {lookup.path}",), index_ttl))
        for tag in entry.tags:
            changes.append(AddToSet(keys.tag(tag), (digest,), index_ttl))
        if lookup.lock is not None:  # released once the entry is there, in the same round trip
            changes.append(Remove((lookup.lock,)))
            lookup.lock = None
        return (entry, digest), self._store.write(*changes)

    # -- stale-while-revalidate ------------------------------------------------------------

    def _refresh(self, request: web.Request, handler: Handler, lookup: _Lookup) -> None:
        """Refresh the entry in the background, once per key, with a copy of the request."""
        if lookup.digest in self._refreshing:
            return
        self._refreshing.add(lookup.digest)
        copy = request.clone(method=hdrs.METH_GET, remote=request.remote or "unknown")  # a HEAD refreshes too
        outcome = request[OUTCOME]
        copy[OUTCOME] = Outcome(service=outcome.service, route=outcome.route, sub=outcome.sub)
        tap = _Capture(self._config, None)
        copy[BODY_TAP] = tap
        task = asyncio.create_task(self._refresh_in_background(copy, handler, lookup, tap))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_in_background(self, copy: web.Request, handler: Handler, lookup: _Lookup, tap: _Capture) -> None:
        lock = self._keys.lock(lookup.digest)
        try:
            if not await self._store.add(lock, b"1", ttl=self._lock_wait):
                return  # another instance is refreshing it
            try:
                await handler(copy)
                _, stored = self._entry(copy, lookup, tap)
                if stored is not None:
                    await stored
            finally:
                await self._quietly(self._store.delete(lock))
        except (Problem, StoreUnavailable) as exc:
            logger.info("cache: background refresh of %s failed: %s", lookup.url, exc)
        except Exception:
            logger.exception("cache: background refresh of %s failed", lookup.url)
        finally:
            self._refreshing.discard(lookup.digest)

    async def peek(self, request: web.Request) -> tuple[str, Entry | None]:
        """The store key ``request`` maps to and the entry stored there, read only (explain)."""
        claims = request.get(CLAIMS)
        subject = None if self._config.shared or claims is None else _subject(claims)
        lookup = await self._lookup(request, subject)
        return self._keys.entry(lookup.digest), lookup.entry

    async def drain(self) -> None:
        """Wait for the background refreshes under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- helpers ---------------------------------------------------------------------------

    def _ttl(self, entry: Entry) -> int:
        return math.floor(entry.fresh - entry.age_at(self._clock()))

    @staticmethod
    async def _quietly(call: Awaitable[object]) -> None:
        try:
            await call
        except StoreUnavailable:
            pass


def _names(vary: bytes | None) -> list[str]:
    """The header names in a stored Vary record."""
    return vary.decode().split(",") if vary else []


def _varying(entry: Entry) -> list[str]:
    return vary_of(CIMultiDict(entry.headers).getall(hdrs.VARY, ())) or []


def _subject(claims: dict[str, object]) -> str:
    sub = claims.get("sub")
    if sub is not None:
        return str(sub)
    # a verified token without a subject: its own claims (never another caller's entry)
    return "claims:" + hashlib.sha256(json.dumps(claims, sort_keys=True, default=str).encode()).hexdigest()


async def purge(store: Store, *, service: str, prefix: str | None = None, tag: str | None = None) -> int:
    """Remove cached entries of ``service``: all of them, those whose path (below the service,
    e.g. ``/users/1``) starts with ``prefix`` at a segment boundary, or those the upstream sent
    with ``Cache-Tag: <tag>``. Give at most one of ``prefix`` and ``tag``.

    Returns the number of stored entries removed: entries that had already expired, or whose
    index record expired, are not counted (a service purge removes those too: it bumps the
    service's generation, so nothing stored before it is served again on any instance).
    Raises :class:`~middleware.base.StoreUnavailable` when the store cannot be reached.
    """
    if prefix is not None and tag is not None:
        raise ValueError("purge by prefix or by tag, not both")
    keys = Keys(service)
    if tag is not None:
        digests = await store.smembers(keys.tag(tag))
        removed = await store.delete(*(keys.entry(d) for d in digests)) if digests else 0
        await store.delete(keys.tag(tag))
        return removed
    records = await store.smembers(keys.index)
    if prefix is None:
        await store.incr(keys.generation)
        removed = await store.delete(*(keys.entry(r.partition(" ")[0]) for r in records)) if records else 0
        await store.delete(keys.index)
        return removed
    base = prefix.rstrip("/")
    matching = [
        digest
        for digest, _, path in (record.partition(" ") for record in records)
        if path == base or path.startswith(base + "/") or (prefix.endswith("/") and path.startswith(prefix))
    ]
    return await store.delete(*(keys.entry(d) for d in matching)) if matching else 0
