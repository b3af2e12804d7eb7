"""WebSocket relay to ``websocket: true`` services (DESIGN §7), and the ``websocket:`` key.

The upstream socket is opened first, with the client's subprotocols and the §5 headers
(``?access_token=`` removed from the query); a refusal reaches the client as problem+json
with the upstream's status (refused → 502, timeout → 504), and no socket is ever left
half-open. Then the client is accepted with the subprotocol the upstream chose and two
symmetric pumps relay text, binary, ping, pong and close (code and reason) frames as they
are: no compression, text bytes not decoded.

Who closes what, and with which code (RFC 6455 §7.4):

- a peer's close frame is forwarded to the other side, then echoed back (code and reason);
- a peer that vanishes (TCP reset, missed heartbeat pong): the other side gets 1001
  ``client went away`` or 1014 ``upstream connection lost``;
- a message over ``max_message``: 1009 on both sides;
- more than ``messages_per_second`` messages from the client (text, binary, ping and pong
  all count; a token bucket holding one second's worth): 1008 on both sides. Messages from
  the upstream are not limited: fan-out is the service's business;
- no text or binary message either way for ``idle_timeout``: 1001 ``idle timeout``;
- the token that opened the socket expires (its ``exp``, plus ``leeway``): 1008;
- shutdown (:func:`close_all`, an ``on_shutdown`` hook): 1001 ``gateway shutting down``;
  an upgrade that arrives after that is refused with 503.

Both sides also get an empty ping after ``ping_interval`` (up to one and a half of it) without
a frame from them; no frame within half of ``ping_interval`` after it counts as the peer
vanishing, as with aiohttp's heartbeat. The relay keeps this time itself, with one timer per
connection that wakes every half ``ping_interval`` and frames counted as they pass: aiohttp's
heartbeat resets its timer on every read, about 15% of what relaying a message cost
(bench/README.md). Every close waits at most :data:`CLOSE_TIMEOUT` for the peer; a client
that does not read is then cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, WSServerHandshakeError, hdrs, web

from middleware.auth import QUERY_TOKEN
from middleware.base import CLAIMS, OUTCOME, Handler
from middleware.problem import Problem

from .config import Route, WebSocketConfig
from .proxy import Forwarder
from .routing import TARGET, Target
from .upstreams import Upstream, UpstreamPool

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

CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the connection is cut
_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions",
     "sec-websocket-accept"}
)  # fmt: skip
_UNSENDABLE = frozenset({0, 1004, 1005, 1006, 1015})  # codes a close frame must not carry


# -- the open sockets of one app ----------------------------------------------------------


class OpenRelays:
    """The relays open in one app: counted for metrics, closed with 1001 on shutdown."""

    def __init__(self) -> None:
        self._sessions: set[_Session] = set()
        self.closing = False  # set by close_all: a relay that opens afterwards is closed at once

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: _Session) -> None:
        self._sessions.add(session)
        if self.closing:
            session.stop(WSCloseCode.GOING_AWAY, "gateway shutting down")

    def discard(self, session: _Session) -> None:
        self._sessions.discard(session)

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, reason: str = "gateway shutting down") -> None:
        """Close every open relay with ``code`` and wait (bounded) until they are gone."""
        self.closing = True
        sessions = list(self._sessions)
        if not sessions:
            return
        logger.info("closing %d WebSocket relays: %s", len(sessions), reason)
        for session in sessions:
            session.stop(code, reason)
        await asyncio.wait([session.finished for session in sessions], timeout=2 * CLOSE_TIMEOUT)


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
        if request.method != hdrs.METH_GET or not web.WebSocketResponse().can_prepare(request).ok:
            raise Problem(400, "not a valid WebSocket upgrade request (GET, Upgrade, Sec-WebSocket-Key/Version 13)")
        relays = request.app.get(OPEN_RELAYS)
        if relays is not None and relays.closing:
            raise Problem(503, "the gateway is shutting down", headers={"Retry-After": "1"})
        offered = tuple(
            name.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for name in value.split(",")
            if name.strip()
        )
        upstream = await self._connect(request, offered)
        config = self._config
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=config.max_message + 1,  # aiohttp refuses a message of exactly its limit
            autoping=False,  # pings and pongs are relayed, not answered here
            autoclose=False,  # close frames are relayed, then echoed
            compress=False,
            timeout=CLOSE_TIMEOUT,
            decode_text=False,
        )
        session = _Session(client, upstream, request.transport, config)
        try:
            await client.prepare(request)
        except ConnectionError:  # the client left while the upstream was being opened: one line, no traceback
            await session.close_upstream(WSCloseCode.GOING_AWAY, "client went away")
            logger.info("client went away during the WebSocket upgrade of %s", request.path)
            request[OUTCOME].error = "client went away during the upgrade"
            raise asyncio.CancelledError from None  # aiohttp ends a handler whose client is gone this way
        except BaseException:
            await session.close_upstream(WSCloseCode.GOING_AWAY, "client went away")
            raise
        if relays is not None:
            relays.add(session)
        try:
            ended = await session.run(self._expiry(request))
        finally:
            if relays is not None:
                relays.discard(session)
        if ended is not None:
            request[OUTCOME].error = ended
        return client

    def _expiry(self, request: web.Request) -> float | None:
        """Seconds until the token that opened the socket expires, or None (no token, no exp)."""
        claims = request.get(CLAIMS)
        exp = claims.get("exp") if claims else None
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            return None
        return max(0.0, exp + self._leeway - self._wall_clock())

    async def _connect(self, request: web.Request, offered: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse[bool]:
        """The upstream socket, on the next healthy upstream (another one after a failed connect)."""
        headers = [(n, v) for n, v in self._forwarder.upstream_headers(request) if n.lower() not in _HANDSHAKE_HEADERS]
        target = request[TARGET]
        target = Target(target.rest, _without_token(target.query))
        tried: list[Upstream] = []
        while True:
            upstream = self._pool.choose(tried)
            request[OUTCOME].upstream = upstream.base
            url = upstream.url_for(target)
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    socket = await self._forwarder.session.ws_connect(
                        url,
                        headers=headers,
                        protocols=offered,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                        autoclose=False,
                        autoping=False,
                        max_msg_size=self._config.max_message + 1,
                        decode_text=False,
                    )
            except aiohttp.ClientConnectorError:
                self._pool.failed(upstream)
                if len(tried) <= self._route.retries:
                    continue
                raise Problem(502, f"upstream {upstream.base} refused the connection") from None
            except WSServerHandshakeError as exc:
                self._pool.succeeded(upstream)  # it answered: up, whatever it said
                raise _refusal(upstream, exc) from None
            except TimeoutError:
                raise Problem(504, f"upstream {upstream.base} did not accept the WebSocket upgrade within "
                                   f"{self._handshake_timeout:g}s") from None  # fmt: skip
            except aiohttp.ClientError as exc:
                raise Problem(502, f"upstream {upstream.base} failed the upgrade: {type(exc).__name__}") from None
            self._pool.succeeded(upstream)
            return socket


async def _ping(socket: _Socket) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # the socket is closing: its pump will see it
        await socket.ping(b"")


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _refusal(upstream: Upstream, exc: WSServerHandshakeError) -> Problem:
    if exc.status >= 400:
        retry_after = exc.headers.get(hdrs.RETRY_AFTER) if exc.headers else None
        headers = {"Retry-After": retry_after} if retry_after else {}
        return Problem(exc.status, f"upstream {upstream.base} refused the WebSocket upgrade", headers=headers)
    return Problem(502, f"upstream {upstream.base} answered the upgrade with {exc.status}: {exc.message}")


def _without_token(query: str | None) -> str | None:
    """The raw query less every ``access_token`` parameter, the rest byte for byte."""
    if query is None or QUERY_TOKEN not in unquote_plus(query):
        return query
    kept = [part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != QUERY_TOKEN]
    return "&".join(kept) if kept else None


# -- one relayed connection ------------------------------------------------------------------


class _How(enum.Enum):
    CLOSED = "closed"  # the source sent a close frame: forward it, then echo it
    LOST = "lost"  # the source is gone: tell the other side
    POLICY = "policy"  # the gateway ends it: close both sides with the same code


class _End(NamedTuple):
    how: _How
    from_client: bool
    code: int
    reason: str


_Socket = web.WebSocketResponse[Any] | aiohttp.ClientWebSocketResponse[Any]


class _Session:
    """Two pumps, the timers, and the closing handshake of one relayed connection."""

    __slots__ = (
        "_beat",
        "_client",
        "_config",
        "_empty_pings",
        "_heard",
        "_idle",
        "_last",
        "_loop",
        "_quiet",
        "_stopped",
        "_tokens",
        "_tokens_at",
        "_transport",
        "_upstream",
        "finished",
    )

    def __init__(
        self,
        client: web.WebSocketResponse[Any],
        upstream: aiohttp.ClientWebSocketResponse[Any],
        transport: asyncio.Transport | None,
        config: WebSocketConfig,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._transport = transport
        self._config = config
        self._loop = loop = asyncio.get_running_loop()
        self._stopped: asyncio.Future[tuple[int, str]] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._last = loop.time()  # of the last text/binary message, either way
        self._tokens = float(config.messages_per_second)  # the client's message budget, as counted
        self._tokens_at = self._last  # when
        self._idle: asyncio.TimerHandle | None = None
        self._empty_pings = [0, 0]  # relayed, not yet answered: from the client, from the upstream
        # the keepalive (see _heartbeat): frames from the client and from the upstream since the
        # last beat, and how many beats in a row heard nothing from each
        self._beat: asyncio.TimerHandle | None = None
        self._heard = [0, 0]
        self._quiet = [0, 0]

    def stop(self, code: int, reason: str) -> None:
        """End the relay from outside (shutdown, idle, expiry): both sides get ``code``."""
        if not self._stopped.done():
            self._stopped.set_result((code, reason))

    async def run(self, expires_in: float | None) -> str | None:
        """Relay until either side goes; say why, when the gateway ended it."""
        loop = self._loop
        self._idle = loop.call_at(self._last + self._config.idle_timeout, self._check_idle)
        self._beat = loop.call_at(self._last + self._config.ping_interval / 2, self._heartbeat)
        expiry = None
        if expires_in is not None:
            expiry = loop.call_later(expires_in, self.stop, WSCloseCode.POLICY_VIOLATION, "token expired")
        up = loop.create_task(self._pump(self._client, self._upstream, from_client=True))
        down = loop.create_task(self._pump(self._upstream, self._client, from_client=False))
        try:
            await asyncio.wait((up, down, self._stopped), return_when=asyncio.FIRST_COMPLETED)
            end = self._first_end(up, down)
            assert end is not None, "asyncio.wait returned: a pump ended or stop() was called"
            await self._close(end)
            await asyncio.wait((up, down), timeout=CLOSE_TIMEOUT)
            return f"websocket closed {end.code}: {end.reason}" if end.how is _How.POLICY else None
        finally:
            if self._idle is not None:
                self._idle.cancel()
            if self._beat is not None:
                self._beat.cancel()
            if expiry is not None:
                expiry.cancel()
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            try:
                await self._close_leftovers(self._first_end(up, down))
            finally:
                self.finished.set_result(None)

    def _first_end(self, up: asyncio.Task[_End], down: asyncio.Task[_End]) -> _End | None:
        for task in (up, down):
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is None:
                    return task.result()
                logger.error("WebSocket relay pump failed", exc_info=error)
                return _End(_How.POLICY, task is up, WSCloseCode.INTERNAL_ERROR, "relay failed")
        if not self._stopped.done():
            return None
        code, reason = self._stopped.result()
        return _End(_How.POLICY, False, code, reason)

    async def _close(self, end: _End) -> None:
        if end.how is _How.POLICY:
            await asyncio.gather(self.close_upstream(end.code, end.reason), self._close_client(end.code, end.reason))
            return
        other, source = (self.close_upstream, self._close_client)
        if not end.from_client:
            other, source = source, other
        await other(end.code, end.reason)
        await source(end.code, end.reason)  # the echo, or nothing when the source is gone already

    async def _pump(self, source: _Socket, sink: _Socket, *, from_client: bool) -> _End:
        limited = from_client
        heard, side = self._heard, 0 if from_client else 1
        try:
            while True:
                message = await source.receive()
                heard[side] += 1
                kind = message.type
                if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                    self._last = now = self._loop.time()
                    if limited and not self._admit(now):
                        return _End(_How.POLICY, from_client, WSCloseCode.POLICY_VIOLATION, "message rate exceeded")
                    await sink.send_frame(message.data, kind)
                elif kind is WSMsgType.PING or kind is WSMsgType.PONG:
                    if limited and not self._admit(self._loop.time()):
                        return _End(_How.POLICY, from_client, WSCloseCode.POLICY_VIOLATION, "message rate exceeded")
                    if not message.data and not self._empty_ping(kind, from_client):
                        continue  # the answer to the gateway's own heartbeat ping
                    await sink.send_frame(message.data, kind)
                elif kind is WSMsgType.CLOSE:
                    code = message.data if message.data not in _UNSENDABLE else WSCloseCode.OK
                    return _End(_How.CLOSED, from_client, code, message.extra or "")
                else:  # CLOSING, CLOSED, ERROR: the source is gone (or broke the protocol)
                    return self._lost(from_client, message.data)
        except ConnectionError:  # the sink's transport is gone
            return self._lost(not from_client, None)

    def _empty_ping(self, kind: WSMsgType, from_client: bool) -> bool:
        """Count empty pings relayed each way; an empty pong is relayed only when it answers one
        (the heartbeat's pings are empty too, and their pongs are nobody else's business)."""
        pending = self._empty_pings
        if kind is WSMsgType.PING:
            pending[0 if from_client else 1] += 1
            return True
        answered = 1 if from_client else 0  # a pong from the client answers a ping relayed from the upstream
        if pending[answered] == 0:
            return False
        pending[answered] -= 1
        return True

    @staticmethod
    def _lost(from_client: bool, error: object) -> _End:
        code = getattr(error, "code", None)
        if code == WSCloseCode.MESSAGE_TOO_BIG:
            return _End(_How.LOST, from_client, code, "message too big")
        if from_client:
            return _End(_How.LOST, True, WSCloseCode.GOING_AWAY, "client went away")
        return _End(_How.LOST, False, WSCloseCode.BAD_GATEWAY, "upstream connection lost")

    def _admit(self, now: float) -> bool:
        """One message from the client against the token bucket; False when it is over the rate."""
        rate = self._config.messages_per_second
        tokens = self._tokens + (now - self._tokens_at) * rate
        if tokens > rate:
            tokens = rate
        if tokens < 1.0:
            return False
        self._tokens, self._tokens_at = tokens - 1.0, now
        return True

    def _heartbeat(self) -> None:
        """Every half ``ping_interval``: ping a side silent for two beats; a side still silent
        one beat after its ping has vanished (aiohttp's missed-pong handling ends its socket,
        and its pump then sees the connection gone)."""
        heard, quiet = self._heard, self._quiet
        sockets: tuple[_Socket, _Socket] = (self._client, self._upstream)
        for side, socket in enumerate(sockets):
            if heard[side]:
                heard[side] = quiet[side] = 0
                continue
            quiet[side] += 1
            if quiet[side] == 2:
                task = self._loop.create_task(_ping(socket))
                task.add_done_callback(_retrieve)
            elif quiet[side] > 2:
                socket._handle_ping_pong_exception(
                    TimeoutError(f"no frame within {self._config.ping_interval / 2:g}s of a ping")
                )
        self._beat = self._loop.call_at(self._loop.time() + self._config.ping_interval / 2, self._heartbeat)

    def _check_idle(self) -> None:
        deadline = self._last + self._config.idle_timeout
        if self._loop.time() >= deadline:
            self.stop(WSCloseCode.GOING_AWAY, "idle timeout")
        else:
            self._idle = self._loop.call_at(deadline, self._check_idle)

    async def close_upstream(self, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
            async with asyncio.timeout(2 * CLOSE_TIMEOUT):  # aiohttp bounds the wait for the reply itself
                await self._upstream.close(code=code, message=reason.encode())

    async def _close_client(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):  # the write itself blocks on a client that does not read
                await self._client.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            if self._transport is not None:
                self._transport.abort()

    async def _close_leftovers(self, end: _End | None) -> None:
        """Close whatever a cancelled run left open: aiohttp cancels the handler of a vanished client
        when ``handler_cancellation`` is on, and every handler on a shutdown that ran out of time."""
        if end is None:
            client_gone = self._transport is None or self._transport.is_closing()
            end = _End(
                _How.LOST, client_gone, WSCloseCode.GOING_AWAY, "client went away" if client_gone else "relay ended"
            )
        if not self._upstream.closed:
            await self.close_upstream(end.code, end.reason)
        if not self._client.closed:
            await self._close_client(end.code, end.reason)
        self._cut_client_if_stuck()

    def _cut_client_if_stuck(self) -> None:
        """A client that stopped reading keeps its unsent bytes, and its socket, forever: drop them."""
        transport = self._transport
        if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
            transport.abort()
