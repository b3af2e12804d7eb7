"""The hit lane: a fresh cache hit answered from the parsed request head (issue 5, bench/README.md).

Through the full chain a cache hit costs an aiohttp ``Request``, a task, the middleware calls,
a ``web.Response`` and its header preparation around a few dictionary reads: about 330k
instructions per request, measured. :class:`GatewayProtocol <gateway.server.GatewayProtocol>`
offers each request head aiohttp's parser has just read to :meth:`HitLane.answer` first; the lane
writes the cached response straight to the socket when, and only when, the full chain's
answer would be exactly that hit. Everything else is handed on untouched, and the full chain
decides. The lane answers only when all of this holds:

- the connection: nothing queued or in progress on it, nothing unsent in its write buffer
  (the protocol checks that);
- the request: ``GET``, HTTP/1.1 kept alive, no body, and only the header fields of
  :data:`ALLOWED_HEADERS` (a field the chain might act on sends the request the full way);
- the route: one whose chain before the proxy is the cache alone, on the memory store
  (``auth: none``, no rate limit, no WebSocket: :attr:`gateway.chain.RouteChain.lone_cache`);
- the cache: :meth:`CacheMiddleware.fresh_hit <middleware.cache.CacheMiddleware.fresh_hit>`
  finds a fresh entry (not stale, no ``Vary``);
- the entry: one whose head the lane writes exactly as aiohttp would (:func:`render_head`).

The client gets the full chain's response byte for byte (only the request id, ``Age`` and the
``ttl`` differ, as they do between any two hits), the access log the same line, and the
metrics the same counts: ``tests/gateway/test_hit_lane.py`` compares both ways side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import hdrs
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict

from middleware.base import Outcome, Recent
from middleware.problem import Problem
from middleware.request_id import FORWARDED_FOR, REQUEST_ID_HEADER, RequestIdMiddleware

from .response_writer import add_default_fields

if TYPE_CHECKING:
    from middleware._cache_key import Entry

    from .app import RouteHolder

__all__ = ("ALLOWED_HEADERS", "HitLane", "render_head")

ALLOWED_HEADERS = frozenset(
    {
        "host",  # keyed by the cache, as on the full path
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "referer",
        "cookie",
        "connection",  # only "keep-alive" (see _plain)
        "x-request-id",  # kept when sane, as the request-id middleware does
        "x-forwarded-for",  # the client address, as the request-id middleware works it out
    }
)
"""Request header fields (lower-cased) that leave a fresh hit the chain's answer. Any other field
(``Authorization``, ``Cache-Control``, ``Upgrade``, ``Expect``, conditionals, framing, anything
unknown) sends the request through the full chain, which knows what to do with it."""

# Fields the full chain sets on a hit itself: an entry holding one of them is replayed the full way
# (aiohttp's header update would replace it in place, which the lane does not copy).
_SET_ON_HIT = frozenset({"x-request-id", "x-cache", "cache-status", "age", "connection", "transfer-encoding"})
_HEADS_BYTES = 8 * 1024 * 1024  # what the remembered heads may hold, their entries' bodies counted
# Statuses whose response has no body, where aiohttp drops framing fields: left to aiohttp.
_BODYLESS = frozenset({204, 304})


class HitLane:
    """Answers fresh cache hits for the routes of the live route table (see the module docstring).

    ``requests`` is the app's request-id middleware: the lane takes request ids and client
    addresses from it and writes its access-log line and metrics through it. ``answered``
    counts the requests the lane answered (tests and the bench read it).
    """

    def __init__(
        self, routes: RouteHolder, requests: RequestIdMiddleware, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._routes = routes
        self._requests = requests
        self._clock = clock
        # id(entry) -> the entry and its rendered head, bounded in bytes like the cache's decoded entries
        self._heads: Recent[int, tuple[Entry, bytes | None]] = Recent(
            entries=1 << 16, max_size=_HEADS_BYTES // 16, max_total=_HEADS_BYTES
        )
        self.answered = 0

    @property
    def open(self) -> bool:
        """False when no route of the live table has a chain the lane could answer for (no cache
        on the memory store alone): the server then does not offer it any request."""
        table = self._routes.table
        return table is not None and table.lone_caches

    def answer(self, message: RawRequestMessage, peer: str | None, scheme: str) -> bytes | None:
        """The whole response to ``message`` when it is a fresh hit the lane may give; else None
        (nothing was done, and the request goes the full way)."""
        started = self._clock()
        if not _plain(message):
            return None
        table = self._routes.table
        if table is None:
            return None
        try:
            match = table.match(message.method, message.path)
        except Problem:  # an unsafe path: the full chain answers it with its 400
            return None
        if match is None or match.lone_cache is None:
            return None
        target = match.target
        found = match.lone_cache.fresh_hit(scheme, message.headers, target.rest or "/", target.query)
        if found is None:
            return None
        entry, hit_headers = found
        head = self._head(entry)
        if head is None:
            return None
        headers = message.headers
        request_id, client = self._requests.identify(headers.get(REQUEST_ID_HEADER), peer, headers.get(FORWARDED_FOR))
        tail = [f"{REQUEST_ID_HEADER}: {request_id}"]
        tail += [f"{name}: {value}" for name, value in hit_headers.items()]
        response = b"".join((head, "\r\n".join(tail).encode(), b"\r\n\r\n", entry.body))
        route = match.route
        outcome = Outcome(service=route.service, route=route.name, cache="HIT")
        self.answered += 1
        self._requests.record(
            request_id, client, message.method, message.path, outcome, entry.status, self._clock() - started
        )
        return response

    def _head(self, entry: Entry) -> bytes | None:
        known = self._heads.get(id(entry))
        if known is not None and known[0] is entry:
            return known[1]
        head = render_head(entry)
        self._heads.keep(id(entry), (entry, head), len(entry.body) + len(head or b""))
        return head


def _plain(message: RawRequestMessage) -> bool:
    """A kept-alive HTTP/1.1 GET without a body whose header fields are all allowed."""
    if message.method != hdrs.METH_GET or message.version != HttpVersion11 or message.should_close:
        return False
    if message.upgrade or message.chunked or not message.path.startswith("/api/"):
        return False
    for name, value in message.headers.items():
        lowered = name.lower()
        if lowered not in ALLOWED_HEADERS or (lowered == "connection" and value.lower() != "keep-alive"):
            return False
    return True


def render_head(entry: Entry) -> bytes | None:
    """The status line and header fields aiohttp writes for the full chain's ``web.Response`` of
    ``entry`` on a kept-alive HTTP/1.1 GET, up to the fields set per hit; None for an entry whose
    head depends on more than that (it is then replayed the full way).

    aiohttp keeps the stored fields in order and adds its own
    (:func:`~gateway.response_writer.add_default_fields`, as for the full chain's answer), and the
    fields go through aiohttp's own serialiser, as the full chain's do.
    """
    if entry.status in _BODYLESS or entry.status < 200 or not entry.reason:
        return None
    headers = CIMultiDict(entry.headers)
    if any(name in headers for name in _SET_ON_HIT):
        return None
    if not add_default_fields(headers, entry.body, date=None):
        return None  # no Date (aiohttp would add the current one), or a Content-Length not the body's
    try:
        head = _serialize_headers(f"HTTP/1.1 {entry.status} {entry.reason}", headers)
    except ValueError:
        return None  # a field aiohttp refuses (a CR or LF in it): the full way answers as aiohttp does
    return head[:-2]  # without the blank line: the fields of the hit follow
