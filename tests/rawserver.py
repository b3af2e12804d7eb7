"""A scripted HTTP/1.1 server on 127.0.0.1: byte-level control of each response, and a record
of the connections a client opened (how many, what came on each, when the client ended each).

A handler gets one :class:`Peer` per accepted connection and writes whatever bytes the test
needs; :func:`answering` makes the common one (a keep-alive server answering each request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from yarl import URL

__all__ = ["Handler", "Peer", "RawServer", "ServerRequest", "answering", "response"]


@dataclass(frozen=True, slots=True)
class ServerRequest:
    """One request as the server read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]  # in order and case, repeats kept (utf-8, surrogateescape)
    head: bytes  # the request line and headers, byte-exact
    body: bytes  # the body, chunked framing removed
    wire_body: bytes  # the body as it came, chunked framing included

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[ServerRequest] = []
        self.client_closed = asyncio.Event()  # a read saw the client's end of the connection (EOF or reset)

    async def read_request(self, *, body: bool = True) -> ServerRequest | None:
        """The next request, or None when the client ended the connection before one came;
        ``body=False`` reads only its head (the body is left unread)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_closed.set()
            return None
        lines = head[:-4].decode("utf-8", "surrogateescape").split("\r\n")
        method, target, _version = lines[0].split(" ")
        headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines[1:])]
        request = ServerRequest(method, target, headers, head, b"", b"")
        if not body:
            self.requests.append(request)
            return request
        if (request.header("Transfer-Encoding") or "").lower() == "chunked":
            content, wire = await self._read_chunked()
        else:
            content = wire = await self.reader.readexactly(int(request.header("Content-Length") or 0))
        request = ServerRequest(method, target, headers, head, content, wire)
        self.requests.append(request)
        return request

    async def _read_chunked(self) -> tuple[bytes, bytes]:
        body = bytearray()
        wire = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            wire += size_line
            size = int(size_line.split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            wire += data
            if size == 0:
                return bytes(body), bytes(wire)
            body += data[:-2]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def until_client_closes(self) -> bytes:
        """Read until the client ends the connection; the bytes it sent meanwhile."""
        data = bytearray()
        try:
            while chunk := await self.reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
        self.client_closed.set()
        return bytes(data)


Handler = Callable[[Peer], Coroutine[Any, Any, None]]


class RawServer:
    """Runs ``handler`` for each connection; the connection is closed when the handler returns."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self.peers: list[Peer] = []
        self._accepted = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()  # the handlers running
        self._connections: set[asyncio.Task[None]] = set()  # asyncio's tasks for each connection
        self.errors: list[BaseException] = []  # raised by a handler: reported when the server closes

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def origin(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}")

    async def peer(self, index: int) -> Peer:
        """The ``index``-th connection accepted (from 0), once it has been."""
        async with self._accepted:
            await self._accepted.wait_for(lambda: len(self.peers) > index)
        return self.peers[index]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = asyncio.current_task()
        assert connection is not None
        self._connections.add(connection)
        peer = Peer(len(self.peers), reader, writer)
        async with self._accepted:
            self.peers.append(peer)
            self._accepted.notify_all()
        # The handler runs in a task of its own, which close() may cancel; this one (asyncio's)
        # must end normally, or asyncio logs the cancellation as an error.
        handler = asyncio.create_task(self._handler(peer))
        self._tasks.add(handler)
        try:
            await handler
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(handler)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._connections.discard(connection)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self.errors:
            raise AssertionError(f"the raw server's handler failed: {self.errors!r}") from self.errors[0]


def response(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> bytes:
    """A complete response with a Content-Length; ``headers`` are ``"Name: value"`` lines."""
    extra = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def answering(respond: Callable[[ServerRequest], bytes] = lambda request: response()) -> Handler:
    """A keep-alive server: ``respond(request)``'s bytes for each request, until the client ends."""

    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            peer.send(respond(request))
            await peer.drain()

    return handle
