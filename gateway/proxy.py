"""Forwarding a request to an upstream and its response back, streaming both ways (DESIGN §5).

Bytes pass through untouched: no decompression, repeated headers kept, redirects not
followed, statuses as they are. Hop-by-hop headers (RFC 9110 §7.6.1, and any named in
``Connection``) are removed in both directions. Upstream-bound requests get
``X-Forwarded-For/Proto/Host`` and ``X-Request-ID``; when the client is not a trusted
proxy, whatever X-Forwarded-* / Forwarded it sent is dropped first (as Traefik does).

aiohttp client errors are translated to problems in one place, :func:`_client_errors`:
refused or reset → 502, timeout → 504, no healthy upstream → 503, body too large → 413.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from middleware.base import BODY_TAP, CLAIMS, OUTCOME, REQUEST_ID, BodyTap, IPNetwork
from middleware.problem import Problem
from middleware.request_id import is_trusted

from .config import Route
from .routing import TARGET
from .upstreams import Upstream, UpstreamPool

__all__ = ("HOP_BY_HOP", "Forwarder", "RouteProxy")

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)  # fmt: skip
# Set by us from what we know, never copied from the client as-is.
_REQUEST_OWN = frozenset(istr(h) for h in ("Host", "Expect", "X-Request-ID"))
_FORWARDED = frozenset(istr(h) for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded"))
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_SMALL_BODY = 64 * 1024  # request bodies up to this size (with a Content-Length) are read whole: retryable
_X_FORWARDED_FOR = istr("X-Forwarded-For")


def connection_named(headers: CIMultiDictProxy[str]) -> frozenset[istr]:
    """Header names listed in ``Connection`` (they are hop-by-hop for this message only)."""
    names: set[istr] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        names.update(istr(token.strip()) for token in value.split(",") if token.strip())
    return frozenset(names)


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


class _Retry(Exception):
    """A connection failure after which the request may go to another upstream."""


class Forwarder:
    """Shared by every route of one app: the pooled session and the request-independent settings."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        trusted_proxies: Sequence[IPNetwork],
        max_body: int,
        strip_headers: frozenset[str] = frozenset(),
        claim_headers: Callable[[Mapping[str, Any] | None], dict[str, str]] | None = None,
    ) -> None:
        self.session = session
        self._trusted = tuple(trusted_proxies)
        self.max_body = max_body
        self._strip = HOP_BY_HOP | _REQUEST_OWN | frozenset(istr(h) for h in strip_headers)
        self._claim_headers = claim_headers

    def upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        """The headers the upstream gets: the client's, less hop-by-hop, plus what we add."""
        drop = self._strip
        named = connection_named(request.headers)
        if named:  # most requests name nothing, or only keep-alive: no new set for them
            drop = drop | named
        trusted = self._peer_trusted(request)
        if not trusted:
            drop = drop | _FORWARDED
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name not in drop:
                headers.add(name, value)
        peer = request.remote or "unknown"
        prior = headers.popall(_X_FORWARDED_FOR, ())
        headers[_X_FORWARDED_FOR] = ", ".join([*prior, peer]) if prior else peer
        headers.setdefault("X-Forwarded-Proto", "https" if request.secure else "http")
        host = request.headers.get(hdrs.HOST)
        if host is not None:
            headers.setdefault("X-Forwarded-Host", host)
        headers["X-Request-ID"] = request[REQUEST_ID]
        if self._claim_headers is not None:
            headers.update(self._claim_headers(request.get(CLAIMS)))
        return headers

    def _peer_trusted(self, request: web.Request) -> bool:
        return bool(self._trusted) and request.remote is not None and is_trusted(request.remote, self._trusted)


class RouteProxy:
    """The endpoint at the end of one route's chain: pick an upstream, forward, stream back."""

    def __init__(self, forwarder: Forwarder, route: Route, pool: UpstreamPool) -> None:
        self._forwarder = forwarder
        self._route = route
        self._pool = pool
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=route.connect_timeout, sock_read=route.timeout
        )

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        forwarder = self._forwarder
        headers = forwarder.upstream_headers(request)
        body, limit = await self._request_body(request)
        idempotent = request.method in _IDEMPOTENT
        target = request[TARGET]
        tried: list[Upstream] = []
        outcome = request[OUTCOME]
        while True:
            upstream = self._pool.choose(tried)
            outcome.upstream = upstream.base
            url = upstream.url_for(target)
            data = body if body is not None or limit is None else _limited(request.content, limit)
            try:
                can_retry = len(tried) <= self._route.retries
                with self._client_errors(upstream, limit, can_retry=can_retry, idempotent=idempotent):
                    upstream_response = await forwarder.session.request(
                        request.method, url, headers=headers, data=data, allow_redirects=False, timeout=self._timeout,
                    )  # fmt: skip
            except _Retry:
                if limit is not None and limit.consumed:
                    raise Problem(502, f"upstream {upstream.base} failed while the body was being sent") from None
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

    @contextlib.contextmanager
    def _client_errors(
        self, upstream: Upstream, limit: _BodyLimit | None, *, can_retry: bool, idempotent: bool
    ) -> Iterator[None]:
        """Translate aiohttp's client errors for one attempt; raise _Retry when another may be made:
        after a failed connect (nothing reached the upstream) for any method, after a reset only
        for idempotent methods, and never once the client's streamed body has been read."""
        try:
            yield
        except (aiohttp.ClientError, TimeoutError) as exc:
            if limit is not None and limit.exceeded:
                raise Problem(413, f"the request body is over the limit of {limit.limit} bytes") from None
            replayable = can_retry and (limit is None or not limit.consumed)
            if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                self._pool.failed(upstream)
                if replayable:
                    raise _Retry from None
            elif isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError) and replayable and idempotent:
                raise _Retry from None
            raise self._problem(upstream, exc) from None

    def _problem(self, upstream: Upstream, exc: BaseException) -> Problem:
        where = f"upstream {upstream.base}"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return Problem(504, f"{where} did not accept a connection within {self._route.connect_timeout:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return Problem(502, f"{where} refused the connection")
        if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
            return Problem(504, f"{where} did not answer within {self._route.timeout:g}s")
        if isinstance(exc, aiohttp.ClientResponseError):
            return Problem(502, f"{where} sent an invalid response: {exc.message}")
        if isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return Problem(502, f"{where} closed the connection: {type(exc).__name__}")
        return Problem(502, f"{where} failed: {type(exc).__name__}")

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        named = connection_named(upstream.headers)
        drop = HOP_BY_HOP | named if named else HOP_BY_HOP
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream.headers.items():
            if name not in drop:
                headers.add(name, value)
        tap = request.get(BODY_TAP)
        if tap is not None:
            wanted = tap.start(upstream.status, upstream.reason or "", list(headers.items()))
            if tap.detached:  # a background refresh: nobody to answer, only the tap to fill
                return await self._fill(request, upstream, tap, wanted)
        length = upstream.content_length
        bodiless = request.method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200
        if not bodiless and length is not None and length <= _SMALL_BODY:
            # Small and announced: read it whole and answer in one write, as a plain Response.
            try:
                body = await upstream.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
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
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                if tap is not None:
                    tap.finish(False)
                # The status line is out: the only honest signal left is to cut the connection.
                request[OUTCOME].error = f"upstream body failed: {type(exc).__name__}"
                logger.warning("upstream body from %s failed mid-stream: %r", request[OUTCOME].upstream, exc)
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
        self, request: web.Request, upstream: aiohttp.ClientResponse, tap: BodyTap, wanted: bool
    ) -> web.StreamResponse:
        """Read the body into a detached tap only, while it wants more; the response is never sent."""
        bodiless = request.method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200
        complete = bodiless
        try:
            while wanted and not bodiless:
                chunk = await upstream.content.readany()
                if not chunk:
                    complete = True
                    break
                wanted = tap.feed(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            logger.warning("upstream body from %s failed during a refresh: %r", request[OUTCOME].upstream, exc)
        tap.finish(complete and wanted)
        return web.StreamResponse(status=upstream.status, reason=upstream.reason)
