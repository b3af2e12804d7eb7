"""Forwarding a request to an upstream and its response back, streaming both ways (DESIGN §5).

Bytes pass through untouched: no decompression, repeated headers kept, redirects not
followed, statuses as they are. Hop-by-hop headers (RFC 9110 §7.6.1, and any named in
``Connection``) are removed in both directions. Upstream-bound requests get
``X-Forwarded-For/Proto/Host`` and ``X-Request-ID``; when the client is not a trusted
proxy, whatever X-Forwarded-* / Forwarded it sent is dropped first (as Traefik does).

Requests go out on :mod:`gateway.upstream_http` (keep-alive connections per upstream), whose
errors are translated to problems in one place, :meth:`RouteProxy._retry_or_raise`: refused
or reset → 502, timeout → 504, no healthy upstream → 503, body too large → 413.

Header names are compared lower-cased: clients send any case (``x-user-id`` is
``X-User-Id``), and a spoofed claim header must be dropped whatever its case.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from middleware.base import BODY_TAP, CLAIMS, OUTCOME, REQUEST_ID, BodyTap, IPNetwork
from middleware.problem import Problem
from middleware.request_id import is_trusted

from .config import Route
from .routing import TARGET
from .upstream_http import (
    ConnectFailed,
    ConnectionBroken,
    ConnectTimeout,
    InvalidResponse,
    ReadTimeout,
    UpstreamError,
    UpstreamResponse,
    not_connected,
)
from .upstreams import Upstream, UpstreamPool

__all__ = ("HOP_BY_HOP", "Forwarder", "RouteProxy", "connection_named")

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
     "te", "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
# Set by us from what we know (the upstream client writes Host and the body framing), never copied.
_REQUEST_OWN = frozenset({"host", "expect", "x-request-id", "content-length"})
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_SMALL_BODY = 64 * 1024  # bodies up to this size with a Content-Length are read whole (requests: retryable)


def connection_named(values: Iterable[str]) -> frozenset[str]:
    """Header names (lower-cased) listed in ``Connection`` values: hop-by-hop for this message only."""
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


@dataclass(slots=True)
class _BodyLimit:
    limit: int
    seen: int = 0
    exceeded: bool = False
    consumed: bool = False  # some of the client's body has been read (a retry can no longer replay it)


async def _limited(content: aiohttp.StreamReader, state: _BodyLimit) -> AsyncIterator[bytes]:
    async for chunk in content.iter_any():
        state.consumed = True
        state.seen += len(chunk)
        if state.seen > state.limit:
            state.exceeded = True
            raise _BodyTooLarge(f"over {state.limit} bytes")
        yield chunk


class _BodyTooLarge(Exception):
    pass


# what one attempt may fail with: the upstream, the client's streamed body, or its size
_ATTEMPT_ERRORS = (_BodyTooLarge, UpstreamError, aiohttp.ClientError, ConnectionError)


class Forwarder:
    """Shared by every route of one app: the request-independent settings of forwarding."""

    def __init__(
        self,
        *,
        trusted_proxies: Sequence[IPNetwork],
        max_body: int,
        strip_headers: frozenset[str] = frozenset(),
        claim_headers: Callable[[Mapping[str, Any] | None], dict[str, str]] | None = None,
    ) -> None:
        self._trusted = tuple(trusted_proxies)
        self.max_body = max_body
        self._strip = HOP_BY_HOP | _REQUEST_OWN | frozenset(h.lower() for h in strip_headers)
        self._strip_untrusted = self._strip | _FORWARDED
        self._claim_headers = claim_headers

    def upstream_headers(self, request: web.Request) -> Headers:
        """The headers the upstream gets: the client's, less hop-by-hop, plus what we add."""
        client = request.headers
        trusted = bool(self._trusted) and request.remote is not None and is_trusted(request.remote, self._trusted)
        drop = self._strip if trusted else self._strip_untrusted
        if hdrs.CONNECTION in client:
            drop = drop | connection_named(client.getall(hdrs.CONNECTION))
        headers = [(name, value) for name, value in client.items() if name.lower() not in drop]
        peer = request.remote or "unknown"
        prior = client.getall(hdrs.X_FORWARDED_FOR, ()) if trusted else ()
        if prior:
            headers = [(name, value) for name, value in headers if name.lower() != "x-forwarded-for"]
        headers.append(("X-Forwarded-For", ", ".join([*prior, peer]) if prior else peer))
        if not trusted or hdrs.X_FORWARDED_PROTO not in client:
            headers.append(("X-Forwarded-Proto", "https" if request.secure else "http"))
        host = client.get(hdrs.HOST)
        if host is not None and (not trusted or hdrs.X_FORWARDED_HOST not in client):
            headers.append(("X-Forwarded-Host", host))
        headers.append(("X-Request-ID", request[REQUEST_ID]))
        if self._claim_headers is not None:
            headers.extend(self._claim_headers(request.get(CLAIMS)).items())
        return headers


class RouteProxy:
    """The endpoint at the end of one route's chain: pick an upstream, forward, stream back."""

    def __init__(self, forwarder: Forwarder, route: Route, pool: UpstreamPool) -> None:
        self._forwarder = forwarder
        self._route = route
        self._pool = pool
        self._tapped = route.cache is not None  # only the cache sets a body tap

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        headers = self._forwarder.upstream_headers(request)
        body, limit = await self._request_body(request)
        method = request.method
        idempotent = method in _IDEMPOTENT
        target = request[TARGET]
        route = self._route
        tried: list[Upstream] = []
        failure: str | None = None  # what the last attempt met, should no upstream be left to try
        outcome = request[OUTCOME]
        while True:
            upstream = self._pool.choose(tried, failure)
            outcome.upstream = upstream.base
            data = body if body is not None or limit is None else _limited(request.content, limit)
            try:
                upstream_response = await upstream.connections.request(
                    method,
                    upstream.path_for(target),
                    headers,
                    data,
                    content_length=request.content_length if limit is not None else None,
                    connect_timeout=route.connect_timeout,
                    read_timeout=route.timeout,
                )
            except _ATTEMPT_ERRORS as exc:
                # a plain except, not a context manager: this runs for every proxied request
                can_retry = len(tried) <= route.retries
                failure = self._retry_or_raise(exc, upstream, limit, can_retry=can_retry, idempotent=idempotent)
                continue
            self._pool.succeeded(upstream)
            async with upstream_response:
                return await self._relay(request, upstream_response)

    async def _request_body(self, request: web.Request) -> tuple[bytes | None, _BodyLimit | None]:
        """Small bodies with a Content-Length are read whole (so a retry can resend them); larger
        or chunked ones stream, counted against max_body."""
        max_body = self._forwarder.max_body
        length = request.content_length
        if length is not None and length > max_body:
            raise Problem(413, f"the request body is {length} bytes; the limit is {max_body}")
        if not request.body_exists:
            return None, None
        if length is not None and length <= _SMALL_BODY:
            return await request.read(), None
        return None, _BodyLimit(max_body)

    def _retry_or_raise(
        self, exc: Exception, upstream: Upstream, limit: _BodyLimit | None, *, can_retry: bool, idempotent: bool
    ) -> str:
        """Translate one attempt's failure into a Problem, or return what it was (the detail it
        would have had) when another attempt may be made: after a failed connect (nothing reached
        the upstream) for any method, after a reset only for idempotent methods, and never once the
        client's streamed body has been read."""
        if isinstance(exc, _BodyTooLarge):
            raise Problem(413, f"the request body is over the limit of {self._forwarder.max_body} bytes") from None
        if not isinstance(exc, UpstreamError):  # reading the client's streamed body
            raise Problem(400, f"the request body broke off: {type(exc).__name__}") from None
        replayable = can_retry and (limit is None or not limit.consumed)
        if isinstance(exc, ConnectFailed):
            self._pool.failed(upstream)
            if replayable:
                return self._problem(upstream, exc).detail
        elif isinstance(exc, ConnectionBroken) and replayable and idempotent:
            return self._problem(upstream, exc).detail
        if limit is not None and limit.consumed and isinstance(exc, ConnectFailed | ConnectionBroken):
            raise Problem(502, f"upstream {upstream.base} failed while the body was being sent") from None
        raise self._problem(upstream, exc) from None

    def _problem(self, upstream: Upstream, exc: UpstreamError) -> Problem:
        where = f"upstream {upstream.base}"
        if isinstance(exc, ConnectTimeout):
            return Problem(504, f"{where} did not accept a connection within {self._route.connect_timeout:g}s")
        if isinstance(exc, ConnectFailed):
            return Problem(502, f"{where} {not_connected(exc)}")
        if isinstance(exc, ReadTimeout):
            return Problem(504, f"{where} did not answer within {self._route.timeout:g}s")
        if isinstance(exc, InvalidResponse):
            return Problem(502, f"{where} sent an invalid response: {exc}")
        return Problem(502, f"{where} closed the connection: {exc}")

    async def _relay(self, request: web.Request, upstream: UpstreamResponse) -> web.StreamResponse:
        drop = HOP_BY_HOP | connection_named((upstream.connection,)) if upstream.connection else HOP_BY_HOP
        headers = [(name, value) for name, value in upstream.headers if name.lower() not in drop]
        tap = request.get(BODY_TAP) if self._tapped else None
        if tap is not None:
            wanted = tap.start(upstream.status, upstream.reason, headers)
            if tap.detached:  # a background refresh: nobody to answer, only the tap to fill
                return await self._fill(request, upstream, tap, wanted)
        length = upstream.content_length
        bodiless = request.method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200
        if not bodiless and length is not None and length <= _SMALL_BODY:
            # Small and announced: read it whole and answer in one write, as a plain Response.
            try:
                body = await upstream.read()
            except UpstreamError as exc:
                if tap is not None:
                    tap.finish(False)
                raise Problem(502, f"upstream {request[OUTCOME].upstream} broke off its response") from exc
            if tap is not None:
                tap.feed(body)
                tap.finish(True)
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
        if bodiless:
            await response.write_eof()
            if tap is not None:
                tap.finish(True)
            return response
        while True:
            try:
                chunk = await upstream.readany()
            except UpstreamError as exc:
                if tap is not None:
                    tap.finish(False)
                # The status line is out: the only honest signal left is to cut the connection.
                request[OUTCOME].error = f"upstream body failed: {type(exc).__name__}"
                logger.warning("upstream body from %s failed mid-stream: %s", request[OUTCOME].upstream, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            if not chunk:
                break
            if tap is not None:
                tap.feed(chunk)
            await response.write(chunk)  # a client that went away raises here, and the request ends
        await response.write_eof()
        if tap is not None:
            tap.finish(True)
        return response

    async def _fill(
        self, request: web.Request, upstream: UpstreamResponse, tap: BodyTap, wanted: bool
    ) -> web.StreamResponse:
        """Read the body into a detached tap only, while it wants more; the response is never sent."""
        bodiless = request.method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200
        complete = bodiless
        try:
            while wanted and not bodiless:
                chunk = await upstream.readany()
                if not chunk:
                    complete = True
                    break
                wanted = tap.feed(chunk)
        except UpstreamError as exc:
            logger.warning("upstream body from %s failed during a refresh: %s", request[OUTCOME].upstream, exc)
        tap.finish(complete and wanted)
        return web.StreamResponse(status=upstream.status, reason=upstream.reason)
