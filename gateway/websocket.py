"""WebSocket upgrades to ``websocket: true`` services (DESIGN §7), and the ``websocket:`` key.

The upstream socket is opened first, with the client's subprotocols and the §5 headers
(``?access_token=`` removed from the query), by the gateway itself on a connection of its own
(no extension offered: frames pass through unchanged). A refusal reaches the client as
problem+json with the upstream's status (its ``Retry-After`` kept; refused → 502, timeout →
504, a response that is not a valid handshake → 502), and no socket is ever left half-open.
Then the client is accepted with the subprotocol the upstream chose, and
:class:`gateway.ws_relay.Relay` passes frames between the two until either side goes: text,
binary, ping, pong and close (code and reason), with the limits, heartbeat and closing
handshake described there. An upgrade that arrives after shutdown began is refused with 503;
shutdown (:func:`close_all`, an ``on_shutdown`` hook) closes every relay with 1001
``gateway shutting down``, and a token that expires (its ``exp``, plus ``leeway``) closes its
relay with 1008.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict

from middleware.auth import QUERY_TOKEN
from middleware.base import CLAIMS, OUTCOME, Handler
from middleware.problem import Problem

from .config import Route, WebSocketConfig
from .proxy import HOP_BY_HOP, Forwarder, connection_named
from .routing import TARGET, Target
from .upstream_http import ConnectFailed, ConnectTimeout, not_connected, request_head
from .upstreams import Upstream, UpstreamPool
from .ws_frames import accept_key, close_frame, new_key, response_head
from .ws_relay import CLOSE_TIMEOUT, Relay, UpstreamSide

__all__ = (
    "CLOSE_TIMEOUT",
    "OPEN_RELAYS",
    "OpenRelays",
    "WebSocketConfig",
    "WebSocketRelay",
    "close_all",
    "install",
    "upgrades_to",
)

logger = logging.getLogger(__name__)

_NOT_PASSED = HOP_BY_HOP | {
    "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions", "sec-websocket-version",
    "content-length", "date", "server",
}  # fmt: skip
_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions",
     "sec-websocket-accept"}
)  # fmt: skip


# -- the open sockets of one app ----------------------------------------------------------


class OpenRelays:
    """The relays open in one app: counted for metrics, closed with 1001 on shutdown."""

    def __init__(self) -> None:
        self._relays: set[Relay] = set()
        self.closing = False  # set by close_all: a relay that opens afterwards is closed at once

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, relay: Relay) -> None:
        self._relays.add(relay)
        if self.closing:
            relay.stop(WSCloseCode.GOING_AWAY, "gateway shutting down")

    def discard(self, relay: Relay) -> None:
        self._relays.discard(relay)

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, reason: str = "gateway shutting down") -> None:
        """Close every open relay with ``code`` and wait (bounded) until they are gone."""
        self.closing = True
        relays = list(self._relays)
        if not relays:
            return
        logger.info("closing %d WebSocket relays: %s", len(relays), reason)
        for relay in relays:
            relay.stop(code, reason)
        await asyncio.wait([relay.finished for relay in relays], timeout=2 * CLOSE_TIMEOUT)


OPEN_RELAYS = web.AppKey("websocket_relays", OpenRelays)


def install(app: web.Application) -> None:
    """Track the app's relays under :data:`OPEN_RELAYS` and close them on shutdown (call once)."""
    app[OPEN_RELAYS] = OpenRelays()
    app.on_shutdown.append(close_all)


async def close_all(app: web.Application) -> None:
    """``on_shutdown`` hook: every open relay is closed with 1001 on both sides."""
    relays = app.get(OPEN_RELAYS)
    if relays is not None:
        await relays.close_all()


# -- the endpoint --------------------------------------------------------------------------


def upgrades_to(relay: Handler, otherwise: Handler) -> Handler:
    """An endpoint sending WebSocket upgrades to ``relay`` and every other request to ``otherwise``."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await relay(request)
        return await otherwise(request)

    return endpoint


class WebSocketRelay:
    """The endpoint for WebSocket upgrades on one ``websocket: true`` route."""

    def __init__(
        self,
        forwarder: Forwarder,
        route: Route,
        pool: UpstreamPool,
        *,
        leeway: float = 0.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if route.websocket is None:
            raise ValueError(f"route {route.name} does not accept WebSocket upgrades")
        self._forwarder = forwarder
        self._route = route
        self._pool = pool
        self._config = route.websocket
        self._leeway = leeway  # seconds after `exp` the socket stays open (the jwt: leeway)
        self._wall_clock = wall_clock
        self._handshake_timeout = route.connect_timeout + route.timeout

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        offered = tuple(
            name.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for name in value.split(",")
            if name.strip()
        )
        # aiohttp's own check of the handshake; told the offered subprotocols, so that it does not
        # warn that none of them is known (which subprotocol is chosen is the upstream's business)
        if request.method != hdrs.METH_GET or not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise Problem(400, "not a valid WebSocket upgrade request (GET, Upgrade, Sec-WebSocket-Key/Version 13)")
        relays = request.app.get(OPEN_RELAYS)
        if relays is not None and relays.closing:
            raise Problem(503, "the gateway is shutting down", headers={"Retry-After": "1"})
        upstream, chosen, passed = await self._connect(request, offered)
        headers = CIMultiDict(passed)
        headers[hdrs.UPGRADE] = "websocket"
        headers[hdrs.CONNECTION] = "upgrade"
        headers[hdrs.SEC_WEBSOCKET_ACCEPT] = accept_key(request.headers[hdrs.SEC_WEBSOCKET_KEY])
        if chosen:
            headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = chosen
        accepted = web.StreamResponse(status=101, reason="Switching Protocols", headers=headers)
        try:
            writer = await accepted.prepare(request)
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away")
        except ConnectionError:  # the client left while the upstream was being opened: one line, no traceback
            _hang_up(upstream, WSCloseCode.GOING_AWAY, "client went away")
            logger.info("client went away during the WebSocket upgrade of %s", request.path)
            request[OUTCOME].error = "client went away during the upgrade"
            raise asyncio.CancelledError from None  # aiohttp ends a handler whose client is gone this way
        except BaseException:
            _hang_up(upstream, WSCloseCode.GOING_AWAY, "client went away")
            raise
        assert writer is not None
        relay = Relay(request, upstream, self._config)
        if relays is not None:
            relays.add(relay)
        try:
            ended = await relay.run(writer, self._expiry(request))
        finally:
            if relays is not None:
                relays.discard(relay)
        if ended is not None:
            request[OUTCOME].error = ended
        return accepted

    def _expiry(self, request: web.Request) -> float | None:
        """Seconds until the token that opened the socket expires, or None (no token, no exp)."""
        claims = request.get(CLAIMS)
        exp = claims.get("exp") if claims else None
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            return None
        return max(0.0, exp + self._leeway - self._wall_clock())

    async def _connect(
        self, request: web.Request, offered: tuple[str, ...]
    ) -> tuple[UpstreamSide, str | None, list[tuple[str, str]]]:
        """The upstream socket, on the next healthy upstream (another one after a failed connect),
        its handshake done: the connection, the subprotocol the upstream chose, and the fields of
        its 101 to pass on to the client."""
        key = new_key()
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if offered:
            headers.append(("Sec-WebSocket-Protocol", ",".join(offered)))
        headers += [(n, v) for n, v in self._forwarder.upstream_headers(request) if n.lower() not in _HANDSHAKE_HEADERS]
        target = request[TARGET]
        target = Target(target.rest, _without_token(target.query))
        tried: list[Upstream] = []
        failure: str | None = None  # what the last attempt met, should no upstream be left to try
        while True:
            upstream = self._pool.choose(tried, failure)
            request[OUTCOME].upstream = upstream.base
            pool = upstream.connections
            side = UpstreamSide()
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    await pool.connect(side, self._route.connect_timeout)
                    assert side.transport is not None
                    side.transport.write(
                        request_head("GET", upstream.path_for(target), pool.host_header, headers, None, None)
                    )
                    status, reason, fields = response_head(await side.response_head())
            except ConnectTimeout:
                self._pool.failed(upstream)
                raise Problem(504, f"upstream {upstream.base} did not accept the connection within "
                                   f"{self._route.connect_timeout:g}s") from None  # fmt: skip
            except ConnectFailed as exc:
                self._pool.failed(upstream)
                failure = f"upstream {upstream.base} {not_connected(exc)}"
                if len(tried) <= self._route.retries:
                    continue
                raise Problem(502, failure) from None
            except TimeoutError:
                _abort(side)
                raise Problem(504, f"upstream {upstream.base} did not accept the WebSocket upgrade within "
                                   f"{self._handshake_timeout:g}s") from None  # fmt: skip
            except (ConnectionError, ValueError) as exc:
                _abort(side)
                raise Problem(502, f"upstream {upstream.base} failed the upgrade: {exc}") from None
            except BaseException:
                _abort(side)
                raise
            self._pool.succeeded(upstream)  # it answered: up, whatever it said
            try:
                chosen = _accepted(upstream.base, status, reason, fields, key, offered)
            except Problem:
                _abort(side)
                raise
            return side, chosen, _passed_on(fields)


def _accepted(
    base: str, status: int, reason: str, fields: list[tuple[str, str]], key: str, offered: tuple[str, ...]
) -> str | None:
    """The subprotocol of upstream ``base``'s handshake response (None: none), or the Problem its
    answer is for the client: a refusal's status with its Retry-After, else 502."""
    field = {name.lower(): value for name, value in fields}.get
    if status != 101:
        if status >= 400:
            retry_after = field("retry-after")
            headers = {"Retry-After": retry_after} if retry_after else {}
            raise Problem(status, f"upstream {base} refused the WebSocket upgrade", headers=headers)
        raise Problem(502, f"upstream {base} answered the upgrade with {status}: {reason}")
    if (
        field("upgrade", "").lower() != "websocket"
        or "upgrade" not in field("connection", "").lower()
        or field("sec-websocket-accept") != accept_key(key)
    ):
        raise Problem(502, f"upstream {base} answered the upgrade with 101: an invalid handshake")
    if field("sec-websocket-extensions"):
        raise Problem(502, f"upstream {base} answered the upgrade with an extension nobody asked for")
    chosen = field("sec-websocket-protocol")
    if chosen is not None and chosen not in offered:
        raise Problem(502, f"upstream {base} chose a subprotocol the client did not offer: {chosen[:40]!r}")
    return chosen


def _passed_on(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The fields of an upstream's 101 the client gets too (``Set-Cookie``, say), as a proxied
    response's: not hop-by-hop, not the handshake's own, not what aiohttp writes itself."""
    named = connection_named([value for name, value in fields if name.lower() == "connection"])
    return [(name, value) for name, value in fields if name.lower() not in _NOT_PASSED and name.lower() not in named]


def _abort(side: UpstreamSide) -> None:
    if side.transport is not None:
        side.transport.abort()


def _hang_up(side: UpstreamSide, code: int, reason: str) -> None:
    """Close an upstream socket that never got its relay: a close frame, then the connection."""
    if side.transport is not None and not side.transport.is_closing():
        side.transport.write(close_frame(code, reason, masked=True))
        side.transport.close()


def _without_token(query: str | None) -> str | None:
    """The raw query less every ``access_token`` parameter, the rest byte for byte."""
    if query is None or QUERY_TOKEN not in unquote_plus(query):
        return query
    kept = [part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != QUERY_TOKEN]
    return "&".join(kept) if kept else None
