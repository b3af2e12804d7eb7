"""The proxy's HTTP/1.1 client: keep-alive connections to one upstream, and nothing else.

aiohttp's ``ClientSession`` is a general client (cookies, redirects, auth, proxies,
tracing, decompression, a request and a response object graph per call), and it is three
quarters of what a straightforward aiohttp proxy spends per request. The proxy needs
much less: write one request it has already checked, read one response as bytes, keep
the connection. This module does only that, on asyncio protocols and the llhttp parser
(``httptools``, the parser uvicorn uses). The WebSocket relay and the JWKS fetch still
use the app's aiohttp session.

One :class:`ConnectionPool` per upstream origin holds its idle keep-alive connections
(most recently used first, closed after ``keepalive`` seconds idle). Closing a pool
closes its idle connections at once and each busy one when its response is done, which
is what a reload that removes an upstream does.

Errors say what a retry may assume: :class:`ConnectFailed` (nothing reached the
upstream), :class:`ConnectionBroken` (closed or reset before a complete response head:
the request may have been seen), :class:`ReadTimeout`, :class:`InvalidResponse`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from collections.abc import AsyncIterable, Awaitable
from typing import Final, cast

import httptools
from yarl import URL

__all__ = (
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionBroken",
    "ConnectionPool",
    "InvalidResponse",
    "ReadTimeout",
    "TlsFailed",
    "UpstreamError",
    "UpstreamResponse",
    "not_connected",
    "request_head",
)

logger = logging.getLogger(__name__)

KEEPALIVE: Final = 30.0  # seconds an idle upstream connection is kept
MAX_IDLE: Final = 256  # idle connections kept per upstream; more are closed on release
_HIGH_WATER: Final = 256 * 1024  # buffered response bytes above which reading from the upstream pauses
_BODYLESS_STATUS: Final = frozenset({204, 304})
_MAX_HEAD: Final = 1024 * 1024  # response head bytes (interim responses included); aiohttp allowed 128 fields of 8 KiB


class UpstreamError(Exception):
    """A request to an upstream that did not get a complete answer."""


class ConnectFailed(UpstreamError):
    """No connection could be made: nothing reached the upstream, any request may go elsewhere."""


class ConnectTimeout(ConnectFailed):
    """The upstream did not accept a connection within the connect timeout."""


class TlsFailed(ConnectFailed):
    """The TLS handshake with an https upstream failed (a certificate the system's CAs do not
    trust, a name it is not for, no protocol in common): nothing was sent. ``reason`` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def not_connected(exc: ConnectFailed) -> str:
    """How a problem's detail says what ``exc`` was, after "upstream <url>"."""
    if isinstance(exc, TlsFailed):
        return f"failed the TLS handshake: {exc.reason}"
    return "refused the connection"


class ConnectionBroken(UpstreamError):
    """The connection closed or was reset before the response (head or body) was complete."""


class ReadTimeout(UpstreamError):
    """The upstream sent nothing for longer than the read timeout."""


class InvalidResponse(UpstreamError):
    """The upstream's bytes are not an HTTP/1.x response."""


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one upstream origin (``http://host:port`` or https)."""

    def __init__(self, origin: URL, *, keepalive: float = KEEPALIVE, max_idle: int = MAX_IDLE) -> None:
        raw_host = origin.raw_host  # an internationalized name in its ASCII (IDNA) form, as Host and SNI need it
        if origin.scheme not in ("http", "https") or not raw_host:
            raise ValueError(f"not an http(s) origin: {origin}")
        self.host = raw_host
        self.port = origin.port or (443 if origin.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if origin.scheme == "https" else None
        default_port = origin.is_default_port()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self._keepalive = keepalive
        self._max_idle = max_idle
        self._idle: collections.deque[_Connection] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Awaitable[UpstreamResponse]:
        """Send one request; awaited, it gives the response once its head is in. The body is
        read from the response, which must be closed (``async with``) to give the connection back.

        ``target`` is the path and query as sent on the request line; ``headers`` must not
        carry Host, Content-Length or Transfer-Encoding: they are written from ``body``
        (bytes: its length; a stream: ``content_length`` if known, else chunked). A plain
        function handing back the exchange's coroutine: no frame of its own on the request's
        wait for the answer (see :func:`gateway.app.dispatch`). A head it refuses, or a closed
        pool, raises here, before anything is awaited.
        """
        if self.closed:
            raise ConnectFailed(f"the connection pool of {self.host_header} is closed")
        # (before taking a connection: a head refused here must not cost one)
        head = request_head(method, target, self.host_header, headers, body, content_length)
        connection = self._idle_connection()
        if connection is None:
            return self._exchange_on_new(method, head, body, content_length is None, connect_timeout, read_timeout)
        return connection.exchange(method, head, body, content_length is None, read_timeout)

    async def _exchange_on_new(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        chunked: bool,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        connection = await self._connect(connect_timeout)
        return await connection.exchange(method, head, body, chunked, read_timeout)

    def close(self) -> None:
        """Close the idle connections now, and each busy one as soon as its response is done."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed by the upstream
            if connection.reusable:
                return connection
            connection.close()
        return None

    async def _connect(self, connect_timeout: float | None) -> _Connection:
        connection = _Connection(self, asyncio.get_running_loop())
        await self.connect(connection, connect_timeout)
        return connection

    async def connect(self, protocol: asyncio.Protocol, connect_timeout: float | None) -> None:
        """A new connection to the origin (TLS for https), not pooled, for ``protocol`` (a
        WebSocket relay's upstream side). Raises ConnectTimeout or ConnectFailed."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: protocol,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError as exc:  # ours, or the kernel's (ETIMEDOUT) when connect_timeout is None or long
            within = f"within {connect_timeout:g}s" if connect_timeout is not None else f"({exc})"
            raise ConnectTimeout(f"no connection to {self.host_header} {within}") from None
        except ssl.SSLError as exc:  # (an OSError too: first)
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            raise TlsFailed(f"TLS with {self.host_header} failed: {exc}", reason) from exc
        except OSError as exc:
            raise ConnectFailed(f"connecting to {self.host_header} failed: {exc}") from exc

    def _release(self, connection: _Connection) -> None:
        """A connection whose response is complete: kept for the next request, or closed."""
        if self.closed or not connection.reusable or len(self._idle) >= self._max_idle:
            connection.close()
            return
        loop = connection.loop
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_at(connection.idle_since + self._keepalive, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for longer than ``keepalive`` (the oldest are on the left)."""
        self._sweep = None
        idle = self._idle
        if not idle:
            return
        loop = idle[0].loop
        deadline = loop.time() - self._keepalive
        while idle and idle[0].idle_since <= deadline:
            idle.popleft().close()
        if idle:
            self._sweep = loop.call_at(idle[0].idle_since + self._keepalive, self._expire)


def request_head(
    method: str,
    target: str,
    host: str,
    headers: list[tuple[str, str]],
    body: bytes | AsyncIterable[bytes] | None,
    content_length: int | None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif body is not None:
        lines.append(f"Content-Length: {content_length}\r\n" if content_length is not None else _CHUNKED)
    elif method in _BODY_METHODS:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    # One CR and one LF per line, and no others: a CR or LF inside a name, value or target
    # would split the head into lines we did not write (header injection).
    if head.count("\r") != len(lines) or head.count("\n") != len(lines):
        raise ValueError("a CR or LF in the request line or a header")
    return head.encode("utf-8", "surrogateescape")


_CHUNKED: Final = "Transfer-Encoding: chunked\r\n"
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class UpstreamResponse:
    """A response head, and its body read with :meth:`read` or :meth:`readany`."""

    __slots__ = ("_closed", "_connection", "connection", "content_length", "headers", "reason", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._closed = False
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers  # (name, value) in the upstream's order and case, repeats kept
        self.content_length = connection.content_length
        self.connection = connection.connection  # the Connection header's value(s), "" if none

    async def readany(self) -> bytes:
        """The next piece of the body; ``b""`` once it is complete."""
        return await self._connection.read_chunk()

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        chunks = []
        while chunk := await self._connection.read_chunk():
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Give the connection back if the response was read to its end, else close it."""
        if not self._closed:  # once: the connection may be serving another request by a second close
            self._closed = True
            self._connection.finish()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed by llhttp."""

    __slots__ = (
        "_body_unsent", "_buffered", "_busy", "_chunked", "_chunks", "_complete", "_drain", "_error", "_head",
        "_head_only", "_head_size", "_keep_alive", "_last_read", "_lost", "_parser", "_paused", "_timeout",
        "_timer", "_timer_due", "_waiter", "connection", "content_length", "headers", "idle_since", "loop", "pool",
        "reason", "status", "transport",
    )  # fmt: skip
    # (slots: one of these per pooled connection, so no __dict__ each)

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._lost = False
        self._busy = False
        self._parser: httptools.HttpResponseParser | None = None
        # the response being read
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.connection = ""  # the Connection header's value(s)
        self._head_only = False  # a HEAD request: the head is the whole response
        self._head: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._keep_alive = False
        self._chunked = False  # the response has a Transfer-Encoding (so its end is not the connection's)
        self._body_unsent = False  # the request body was cut short: the connection cannot be reused
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = 0.0  # the read timeout of the request under way; 0: none
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._last_read = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._head_size = 0  # bytes received before the final response head was complete

    @property
    def reusable(self) -> bool:
        return not self._lost and self.transport is not None and not self.transport.is_closing()

    # --- the request ---------------------------------------------------------------------

    async def exchange(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        chunked: bool,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        transport = self.transport
        assert transport is not None and not self._busy
        self._busy = True
        self._start_response(method == "HEAD")
        head_future = self._head = self.loop.create_future()
        try:
            if isinstance(body, bytes):
                transport.write(head + body if len(body) < 16384 else head)
                if len(body) >= 16384:
                    transport.write(body)
            else:
                transport.write(head)
                if body is not None:
                    await self._send_stream(body, chunked, read_timeout)
            if read_timeout is not None:  # the upstream's time to answer counts once the request is sent
                self._arm_read_timer(read_timeout)
            await head_future
        except BaseException:
            self.close()
            self.finish()
            raise
        return UpstreamResponse(self)

    async def _send_stream(self, body: AsyncIterable[bytes], chunked: bool, stall: float | None) -> None:
        """Write a streamed body; an upstream that takes none of it for ``stall`` seconds (the
        route's read timeout) and does not answer either is given up on with ReadTimeout."""
        transport = self.transport
        head = self._head
        assert transport is not None and head is not None
        async for chunk in body:
            if self._lost or head.done():
                self._body_unsent = True  # the upstream answered (or went away) before taking the whole body
                break
            if chunked:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._drain is not None:
                try:
                    async with asyncio.timeout(stall):
                        await self._drain  # also ended by the response head, or a failure: see _wake_sender
                except TimeoutError:
                    raise ReadTimeout(f"{self.pool.host_header} took no request body for {stall:g}s") from None
                if self._lost or head.done():
                    self._body_unsent = True
                    break
        else:
            if chunked and not self._lost:
                transport.write(b"0\r\n\r\n")

    def _start_response(self, head_only: bool) -> None:
        if self._parser is None:  # after a complete response the parser is ready for the next one
            self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = ""
        self.headers = []
        self.content_length = None
        self.connection = ""
        self._head_only = head_only
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._chunked = False
        self._body_unsent = False
        self._error = None
        self._head_size = 0
        self._timeout = 0.0

    # --- the response body ---------------------------------------------------------------

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self._timeout:
                self._last_read = self.loop.time()  # the read timeout counts from when we start waiting
            waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def finish(self) -> None:
        """The caller is done with the response: back to the pool if it was read to the end."""
        if not self._busy:
            return
        self._busy = False
        self._head = None
        if self._complete and self._keep_alive and not self._body_unsent and not self._chunks:
            if self._head_only:
                self._parser = None  # llhttp cannot be told a response had no body: it would wait for one
            self.pool._release(self)
        else:
            self.close()

    def close(self) -> None:
        self._lost = True
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                # Unsent request bytes (an upstream that answered, or failed, without taking the
                # whole body): close() would wait for the upstream to read them, maybe forever.
                transport.abort()
            else:
                transport.close()

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            self.close()  # bytes nobody asked for: the connection can no longer be trusted
            return
        if self._timeout:
            self._last_read = self.loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(InvalidResponse(f"invalid response from {self.pool.host_header}: {exc}"))
            self.close()
            return
        if self.status == 0:  # llhttp keeps a head however long it gets: the limit is ours
            self._head_size += len(data)
            if self._head_size > _MAX_HEAD:
                self._fail(InvalidResponse(f"{self.pool.host_header} sent a response head over {_MAX_HEAD} bytes"))
                self.close()

    def eof_received(self) -> bool | None:
        self._lost = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        head_in = self.status != 0
        if head_in and not self._complete and exc is None and self.content_length is None and not self._chunked:
            self._message_complete()  # a body delimited by the end of the connection (RFC 9112 §6.3)
        if not self._complete:
            what = "response head" if self._head is not None and not self._head.done() else "response body"
            reason = f": {exc}" if exc else ""
            closed = f"{self.pool.host_header} closed the connection before the {what} ended{reason}"
            self._fail(ConnectionBroken(closed))
        self._wake_sender()

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # --- llhttp callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")  # in pieces when the status line is split across reads

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: the connection is out of step
            raise InvalidResponse(f"{self.pool.host_header} sent more than one response")
        self.reason = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a trailer field, after a chunked body: not part of the head the caller has
        text = name.decode("utf-8", "surrogateescape")
        self.headers.append((text, value.decode("utf-8", "surrogateescape")))
        if len(name) == 14 and text.lower() == "content-length":
            self.content_length = int(value)  # llhttp has checked it is one number
        elif len(name) == 17 and text.lower() == "transfer-encoding":
            self._chunked = True
        elif len(name) == 10 and text.lower() == "connection":
            tokens = value.decode("latin-1")
            self.connection = f"{self.connection}, {tokens}" if self.connection else tokens

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:  # an interim response (103 Early Hints...): the real one follows
            self.headers = []
            self.reason = ""
            self.content_length = None
            self.connection = ""
            return
        self.status = status
        self._keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        if self._head_only or status in _BODYLESS_STATUS:
            self._message_complete()  # (a HEAD's Content-Length is that of the body a GET would get)
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)
            self._wake_sender()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an interim response
            return
        if not self._complete:
            self._message_complete()

    def _message_complete(self) -> None:
        self._complete = True
        self._wake()

    # --- waking the reader ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()
        self._wake_sender()

    def _wake_sender(self) -> None:
        """End a request body's wait for the upstream to take more: it has answered, or failed."""
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _arm_read_timer(self, timeout: float) -> None:
        """Start the request's read timeout. A timer left by an earlier request on this connection
        is kept when it is due no later (it looks again when it fires): a connection busy with
        one request after another sets a timer about once per timeout, not once per request."""
        now = self.loop.time()
        self._timeout, self._last_read = timeout, now
        due = now + timeout
        if self._timer is not None and self._timer_due > due:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer, self._timer_due = self.loop.call_at(due, self._check_timeout), due

    def _check_timeout(self) -> None:
        """The read timer: fires at most once per timeout period, however much data arrives;
        dropped when no response is being read (an earlier request's timer)."""
        self._timer = None
        if self._complete or not self._busy or not self._timeout:
            return
        waiting = (self._head is not None and not self._head.done()) or self._waiter is not None
        due = self._last_read + self._timeout
        now = self.loop.time()
        if waiting and now >= due:
            self._fail(ReadTimeout(f"{self.pool.host_header} sent nothing for {self._timeout:g}s"))
            self.close()
            return
        at = max(due, now + 0.001) if waiting else now + self._timeout
        self._timer, self._timer_due = self.loop.call_at(at, self._check_timeout), at
