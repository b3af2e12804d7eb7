"""The proxy's own HTTP/1.1 client (gateway.upstream_http) against real servers on 127.0.0.1.

Most upstreams here are :class:`tests.rawserver.RawServer`: the test writes the response
bytes itself and sees each connection the client opens, and when the client ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.upstream_http import (
    _HIGH_WATER,
    ConnectFailed,
    ConnectionBroken,
    ConnectionPool,
    ConnectTimeout,
    InvalidResponse,
    ReadTimeout,
)
from tests.conftest import REFUSED
from tests.rawserver import Handler, Peer, RawServer, ServerRequest, answering, response

WAIT = 10.0  # seconds any one wait may take before the test fails (generous: a loaded 2-core machine)

T = TypeVar("T")
Serve = Callable[[Handler], Awaitable[RawServer]]
MakePool = Callable[..., ConnectionPool]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler)``: a started :class:`RawServer`, closed at teardown."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool(serve: Serve) -> AsyncIterator[MakePool]:
    """``make_pool(server_or_origin, **options)``: a ConnectionPool, closed at teardown (before the servers)."""
    pools: list[ConnectionPool] = []

    def make(target: RawServer | TestServer | URL, **options: float) -> ConnectionPool:
        if isinstance(target, RawServer):
            origin = target.origin
        elif isinstance(target, TestServer):
            origin = URL(f"http://127.0.0.1:{target.port}")
        else:
            origin = target
        pool = ConnectionPool(origin, **options)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
    await asyncio.sleep(0)  # closed transports finish closing on the next loop turn


async def within(awaitable: Awaitable[T], seconds: float = WAIT) -> T:
    return await asyncio.wait_for(awaitable, seconds)


async def eventually(check: Callable[[], bool], seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def fetch(
    pool: ConnectionPool,
    target: str = "/",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
    **options: float | int | None,
) -> tuple[int, bytes]:
    """One request, its whole body read, the response closed: (status, body)."""
    upstream = await within(pool.request(method, target, headers or [], body, **options))  # type: ignore[arg-type]
    async with upstream:
        return upstream.status, await within(upstream.read())


# --- keep-alive ----------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering(lambda request: response(request.target.encode())))
    pool = make_pool(server)
    for n in range(3):
        assert await fetch(pool, f"/{n}") == (200, f"/{n}".encode())
    assert len(server.peers) == 1
    assert [request.target for request in server.peers[0].requests] == ["/0", "/1", "/2"]


async def test_concurrent_requests_open_several_connections_that_are_reused_afterwards(
    serve: Serve, make_pool: MakePool
) -> None:
    together = asyncio.Barrier(3)  # no answer until three requests are in: they must be on three connections

    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await together.wait()
            peer.send(response(request.target.encode()))

    server = await serve(handle)
    pool = make_pool(server)
    for round_ in range(2):
        targets = [f"/{round_}-{n}" for n in range(3)]
        results = await asyncio.gather(*(fetch(pool, target) for target in targets))
        assert results == [(200, target.encode()) for target in targets]
    assert len(server.peers) == 3
    assert [len(peer.requests) for peer in server.peers] == [2, 2, 2]


# --- close() and keepalive -----------------------------------------------------------------


async def test_close_closes_the_idle_connections(serve: Serve, make_pool: MakePool) -> None:
    together = asyncio.Barrier(2)

    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await together.wait()
            peer.send(response(request.target.encode()))

    server = await serve(handle)
    pool = make_pool(server)
    await asyncio.gather(fetch(pool, "/a"), fetch(pool, "/b"))
    assert len(server.peers) == 2 and not any(peer.client_closed.is_set() for peer in server.peers)
    pool.close()
    for peer in server.peers:
        await within(peer.client_closed.wait())  # the server saw EOF on both


async def test_close_lets_a_busy_response_finish_then_closes_its_connection(serve: Serve, make_pool: MakePool) -> None:
    rest = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await rest.wait()
        peer.send(b"world")
        assert await peer.read_request() is None  # the client ends the connection instead of reusing it

    server = await serve(handle)
    pool = make_pool(server)
    upstream = await within(pool.request("GET", "/", []))
    async with upstream:
        assert await within(upstream.readany()) == b"hello"
        pool.close()
        rest.set()
        assert await within(upstream.read()) == b"world"  # the connection outlived close()
    peer = await server.peer(0)
    await within(peer.client_closed.wait())  # and was closed once the response was done


async def test_requests_after_close_raise_connect_failed(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering())
    pool = make_pool(server)
    pool.close()
    with pytest.raises(ConnectFailed):
        await pool.request("GET", "/", [])
    assert server.peers == []


async def test_idle_connection_is_closed_after_keepalive_seconds(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering())
    pool = make_pool(server, keepalive=0.2)
    await fetch(pool)
    await within((await server.peer(0)).client_closed.wait())
    await fetch(pool)  # and the next request opens a new one
    assert len(server.peers) == 2


async def test_connection_used_again_within_keepalive_is_kept(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering())
    pool = make_pool(server, keepalive=2.0)
    for _ in range(3):  # 2.4 s in all, longer than keepalive, but never 2 s idle
        await fetch(pool)
        await asyncio.sleep(0.8)
    await fetch(pool)
    assert len(server.peers) == 1


# --- response framing ----------------------------------------------------------------------


async def test_body_delimited_by_connection_close_is_read_whole_and_connection_not_reused(
    serve: Serve, make_pool: MakePool
) -> None:
    pieces = [b"first piece, ", b"second piece, ", b"last piece"]

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for piece in pieces:
            await asyncio.sleep(0.02)  # separate packets
            peer.send(piece)
            await peer.drain()
        # returning closes the connection: the end of the body

    server = await serve(handle)
    pool = make_pool(server)
    assert await fetch(pool) == (200, b"".join(pieces))
    await fetch(pool)
    assert len(server.peers) == 2


async def test_chunked_response_is_read_whole_and_connection_reused(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await peer.drain()
            await asyncio.sleep(0.02)
            peer.send(b"7;ext=1\r\n, world\r\n0\r\n\r\n")

    server = await serve(handle)
    pool = make_pool(server)
    assert await fetch(pool) == (200, b"hello, world")
    assert await fetch(pool) == (200, b"hello, world")
    assert len(server.peers) == 1


async def test_chunked_trailer_fields_are_not_added_to_the_response_headers(serve: Serve, make_pool: MakePool) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
    chunked = head + b"3\r\nabc\r\n0\r\nX-Digest: d\r\n\r\n"
    server = await serve(answering(lambda request: chunked))
    pool = make_pool(server)
    async with await within(pool.request("GET", "/", [])) as upstream:
        assert await within(upstream.read()) == b"abc"
        assert upstream.headers == [("Transfer-Encoding", "chunked"), ("Trailer", "X-Digest")]
    assert await fetch(pool) == (200, b"abc")
    assert len(server.peers) == 1


async def test_connection_close_response_is_not_reused(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering(lambda request: response(b"bye", "Connection: close")))
    pool = make_pool(server)
    assert await fetch(pool) == (200, b"bye")
    await within((await server.peer(0)).client_closed.wait())
    assert await fetch(pool) == (200, b"bye")
    assert len(server.peers) == 2


@pytest.mark.parametrize("paced", [False, True], ids=["one write", "separate writes"])
async def test_interim_responses_before_the_final_one_are_skipped(
    serve: Serve, make_pool: MakePool, paced: bool
) -> None:
    interim = [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ]
    final = response(b"final", "X-Final: 1")

    async def handle(peer: Peer) -> None:
        while await peer.read_request() is not None:
            for part in [*interim, final]:
                peer.send(part)
                if paced:
                    await peer.drain()
                    await asyncio.sleep(0.02)

    server = await serve(handle)
    pool = make_pool(server)
    async with await within(pool.request("GET", "/", [])) as upstream:
        assert (upstream.status, upstream.reason) == (200, "OK")
        assert upstream.headers == [("Content-Length", "5"), ("X-Final", "1")]
        assert await within(upstream.read()) == b"final"
    assert await fetch(pool) == (200, b"final")
    assert len(server.peers) == 1


async def test_head_completes_without_waiting_for_a_body_and_the_next_get_gets_its_whole_body(
    serve: Serve, make_pool: MakePool
) -> None:
    def respond(request: ServerRequest) -> bytes:
        whole = response(b"0123456789", "Content-Type: text/plain")
        return whole[: -len(b"0123456789")] if request.method == "HEAD" else whole

    server = await serve(answering(respond))
    pool = make_pool(server)
    async with await within(pool.request("HEAD", "/", [])) as upstream:
        assert upstream.status == 200
        assert upstream.content_length == 10  # the length a GET would get
        assert await within(upstream.read()) == b""
    assert await fetch(pool) == (200, b"0123456789")
    assert await fetch(pool, method="HEAD") == (200, b"")
    assert await fetch(pool) == (200, b"0123456789")
    assert len(server.peers) == 1


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 204 No Content\r\n\r\n", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n'],
    ids=["204", "304"],
)
async def test_bodiless_statuses_complete_without_a_body(serve: Serve, make_pool: MakePool, head: bytes) -> None:
    def respond(request: ServerRequest) -> bytes:
        return head if request.target == "/empty" else response(b"full")

    server = await serve(answering(respond))
    pool = make_pool(server)
    status = int(head.split()[1])
    assert await fetch(pool, "/empty") == (status, b"")
    assert await fetch(pool, "/full") == (200, b"full")  # the connection is in step for the next one
    assert len(server.peers) == 1


# --- read timeouts -------------------------------------------------------------------------


async def test_server_that_never_answers_is_a_read_timeout(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.until_client_closes()

    server = await serve(handle)
    pool = make_pool(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReadTimeout):
        await within(pool.request("GET", "/", [], read_timeout=0.3))
    assert loop.time() - started >= 0.29
    await within((await server.peer(0)).client_closed.wait())  # and the connection is given up


def answers_once_then_stalls() -> Callable[[Peer], Awaitable[None]]:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(response(b"first"))
        await peer.read_request()
        await peer.until_client_closes()

    return handle


async def test_a_shorter_read_timeout_on_a_reused_connection_applies(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answers_once_then_stalls())
    pool = make_pool(server)
    assert await fetch(pool, read_timeout=30.0) == (200, b"first")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReadTimeout):
        await within(pool.request("GET", "/", [], read_timeout=0.3))  # the same connection, a 30 s timer on it
    assert loop.time() - started < 2.0
    assert len(server.peers) == 1


async def test_a_reused_connection_gets_the_whole_read_timeout_again(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answers_once_then_stalls())
    pool = make_pool(server)
    assert await fetch(pool, read_timeout=0.5) == (200, b"first")
    await asyncio.sleep(0.3)  # the first exchange's deadline is 0.2 s away now
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReadTimeout):
        await within(pool.request("GET", "/", [], read_timeout=0.5))
    assert loop.time() - started >= 0.49
    assert len(server.peers) == 1


async def test_a_connection_busy_with_one_request_after_another_sets_its_read_timer_once(
    serve: Serve, make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            peer.send(response(request.target.encode()))

    server = await serve(handle)
    pool = make_pool(server)
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Callable[..., object], *args: object, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") == "_check_timeout":
            timers.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    for n in range(20):
        assert await fetch(pool, f"/{n}", read_timeout=30.0) == (200, f"/{n}".encode())
    assert len(server.peers) == 1
    assert len(timers) == 1  # the first request's timer, due long after the last one ended


async def test_body_stalled_mid_way_is_a_read_timeout_from_readany(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.until_client_closes()

    server = await serve(handle)
    pool = make_pool(server)
    async with await within(pool.request("GET", "/", [], read_timeout=0.3)) as upstream:
        assert await within(upstream.readany()) == b"abc"
        with pytest.raises(ReadTimeout):
            await within(upstream.readany())
    await within((await server.peer(0)).client_closed.wait())


async def test_body_trickling_within_the_read_timeout_is_not_timed_out(serve: Serve, make_pool: MakePool) -> None:
    pieces = [b"%02d" % n for n in range(25)]

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        for piece in pieces:  # 2.5 s in all, more than twice the timeout, but never 1 s quiet
            await asyncio.sleep(0.1)
            peer.send(piece)
            await peer.drain()
        await peer.until_client_closes()

    server = await serve(handle)
    pool = make_pool(server)
    assert await fetch(pool, read_timeout=1.0) == (200, b"".join(pieces))


async def test_request_body_streamed_for_longer_than_the_read_timeout_is_not_timed_out(
    serve: Serve, make_pool: MakePool
) -> None:
    """The read timeout is the upstream's: it counts from when the request has been sent."""
    server = await serve(answering(lambda request: response(hashlib.sha256(request.body).hexdigest().encode())))
    pool = make_pool(server)
    pieces = [b"%02d" % n for n in range(25)]

    async def slowly() -> AsyncIterator[bytes]:  # a slow client's upload: 2.5 s, the timeout is 1 s
        for piece in pieces:
            await asyncio.sleep(0.1)
            yield piece

    status, body = await fetch(pool, "/upload", "POST", body=slowly(), read_timeout=1.0)
    assert (status, body) == (200, hashlib.sha256(b"".join(pieces)).hexdigest().encode())


# --- connect failures ----------------------------------------------------------------------


async def test_refused_port_is_connect_failed(make_pool: MakePool) -> None:
    pool = make_pool(URL(REFUSED))
    with pytest.raises(ConnectFailed) as raised:
        await within(pool.request("GET", "/", [], connect_timeout=5.0))
    assert not isinstance(raised.value, ConnectTimeout)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A port whose listening socket never accepts and whose backlog is full: connects hang."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(16):
            sock = socket.socket()
            held.append(sock)
            sock.settimeout(0.5)
            try:
                sock.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # this one's SYN was dropped: the backlog is full
        else:
            pytest.skip("the kernel accepted 16 connections into a backlog of 0: no way to make a connect hang")
        yield port
    finally:
        for sock in held:
            sock.close()
        listener.close()


async def test_connect_that_does_not_complete_in_time_is_connect_timeout(make_pool: MakePool) -> None:
    with full_backlog() as port:
        pool = make_pool(URL(f"http://127.0.0.1:{port}"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectTimeout):
            await within(pool.request("GET", "/", [], connect_timeout=0.3))
        assert loop.time() - started >= 0.29


# --- broken and invalid responses ----------------------------------------------------------


async def test_server_closing_before_responding_is_connection_broken(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()  # and returning closes the connection

    pool = make_pool(await serve(handle))
    with pytest.raises(ConnectionBroken):
        await within(pool.request("GET", "/", []))


async def test_server_closing_mid_body_is_connection_broken_from_readany(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.drain()

    pool = make_pool(await serve(handle))
    async with await within(pool.request("GET", "/", [])) as upstream:
        assert await within(upstream.readany()) == b"abc"
        with pytest.raises(ConnectionBroken):
            await within(upstream.readany())


async def test_garbage_response_is_invalid_response(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await peer.until_client_closes()

    server = await serve(handle)
    pool = make_pool(server)
    with pytest.raises(InvalidResponse):
        await within(pool.request("GET", "/", []))
    await within((await server.peer(0)).client_closed.wait())


async def test_unsolicited_response_with_the_first_one_means_the_connection_is_not_reused(
    serve: Serve, make_pool: MakePool
) -> None:
    def respond(request: ServerRequest) -> bytes:
        return response(b"first") + response(b"EXTRA") if request.target == "/twice" else response(b"second")

    server = await serve(answering(respond))
    pool = make_pool(server)
    assert await fetch(pool, "/twice") == (200, b"first")
    assert await fetch(pool, "/next") == (200, b"second")
    assert len(server.peers) == 2


async def test_unsolicited_response_on_an_idle_connection_closes_it(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            peer.send(response(request.target.encode()))
            if request.target == "/first":
                await peer.drain()
                await asyncio.sleep(0.05)  # the client has the first response by now
                peer.send(response(b"EXTRA"))

    server = await serve(handle)
    pool = make_pool(server)
    assert await fetch(pool, "/first") == (200, b"/first")
    await within((await server.peer(0)).client_closed.wait())  # the client dropped the connection
    assert await fetch(pool, "/next") == (200, b"/next")
    assert len(server.peers) == 2


# --- the request head ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("X-A", "1\r\nX-Injected: 1")]),
        ("/", [("X-A", "1\nX-Injected: 1")]),
        ("/", [("X-A", "1\r")]),
        ("/", [("X-A\r\nX-Injected", "1")]),
        ("/ HTTP/1.1\r\nX-Injected: 1\r\nX-B:", []),
        ("/\n", []),
    ],
    ids=["CRLF in a value", "LF in a value", "CR in a value", "CRLF in a name", "CRLF in target", "LF in target"],
)
async def test_cr_or_lf_in_the_head_is_refused_before_anything_is_written(
    serve: Serve, make_pool: MakePool, target: str, headers: list[tuple[str, str]]
) -> None:
    server = await serve(answering(lambda request: response(request.target.encode())))
    pool = make_pool(server)
    assert await fetch(pool, "/before") == (200, b"/before")
    with pytest.raises(ValueError):
        await pool.request("GET", target, headers)
    assert await fetch(pool, "/after") == (200, b"/after")
    assert len(server.peers) == 1  # the idle connection was neither written to nor dropped
    assert [request.target for request in server.peers[0].requests] == ["/before", "/after"]


async def test_cr_or_lf_refused_on_a_new_pool_opens_no_connection(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering())
    pool = make_pool(server)
    with pytest.raises(ValueError):
        await pool.request("GET", "/", [("X-A", "1\r\nX-Injected: 1")])
    assert await fetch(pool) == (200, b"ok")
    assert len(server.peers) == 1


async def test_request_head_carries_host_and_the_headers_in_order(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering())
    pool = make_pool(server)
    headers = [("X-B", "2"), ("x-a", "1"), ("X-B", "3"), ("X-Bytes", "caf\udcc3\udca9 \udcff")]
    await fetch(pool, "/p?q=%20&r", headers=headers)
    request = server.peers[0].requests[0]
    assert request.head == (
        f"GET /p?q=%20&r HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3\r\n".encode()
        + b"X-Bytes: caf\xc3\xa9 \xff\r\n\r\n"
    )


# --- request bodies ------------------------------------------------------------------------


def echo_body(request: ServerRequest) -> bytes:
    framing = request.header("Content-Length") or request.header("Transfer-Encoding") or "none"
    return response(request.body, f"X-Framing: {framing}")


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_bytes_body_is_sent_with_its_content_length(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering(echo_body))
    pool = make_pool(server)
    for body in (b"small", bytes(range(256)) * 100):  # one write with the head, and a separate one
        assert await fetch(pool, method="PUT", body=body) == (200, body)
    assert [request.header("Content-Length") for request in server.peers[0].requests] == ["5", "25600"]


async def test_streamed_body_with_a_content_length_is_sent_with_it(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering(echo_body))
    pool = make_pool(server)
    assert await fetch(pool, method="POST", body=pieces(b"abc", b"", b"defg"), content_length=7) == (200, b"abcdefg")
    request = server.peers[0].requests[0]
    assert (request.header("Content-Length"), request.header("Transfer-Encoding")) == ("7", None)
    assert request.wire_body == b"abcdefg"


async def test_streamed_body_without_a_length_is_sent_chunked(serve: Serve, make_pool: MakePool) -> None:
    server = await serve(answering(echo_body))
    pool = make_pool(server)
    body = pieces(b"abc", b"", b"0123456789abcdefXYZ")  # an empty piece is not the last chunk
    assert await fetch(pool, method="POST", body=body) == (200, b"abc0123456789abcdefXYZ")
    request = server.peers[0].requests[0]
    assert (request.header("Content-Length"), request.header("Transfer-Encoding")) == (None, "chunked")
    assert request.wire_body == b"3\r\nabc\r\n13\r\n0123456789abcdefXYZ\r\n0\r\n\r\n"
    assert await fetch(pool) == (200, b"")  # and the connection stays in step
    assert len(server.peers) == 1


@pytest.mark.parametrize(("method", "length"), [("POST", "0"), ("PUT", "0"), ("PATCH", "0"), ("GET", None)])
async def test_request_without_a_body_has_content_length_zero_only_for_body_methods(
    serve: Serve, make_pool: MakePool, method: str, length: str | None
) -> None:
    server = await serve(answering(echo_body))
    pool = make_pool(server)
    assert await fetch(pool, method=method) == (200, b"")
    request = server.peers[0].requests[0]
    assert (request.header("Content-Length"), request.header("Transfer-Encoding")) == (length, None)


async def test_upstream_answering_before_taking_the_whole_streamed_body_is_delivered_and_not_reused(
    serve: Serve, make_pool: MakePool
) -> None:
    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request(body=False)) is not None:
            if request.target == "/upload":
                peer.send(response(b"too large", status="413 Content Too Large"))
                await peer.drain()
                await peer.until_client_closes()
                return
            peer.send(response(b"fine"))

    sent: list[int] = []

    async def endless() -> AsyncIterator[bytes]:  # a client still uploading when the answer comes
        for n in range(1000):
            sent.append(n)
            yield b"x" * 100
            await asyncio.sleep(0.01)

    server = await serve(handle)
    pool = make_pool(server)
    assert await fetch(pool, "/upload", "POST", body=endless()) == (413, b"too large")
    assert len(sent) < 1000
    await within((await server.peer(0)).client_closed.wait())
    assert await fetch(pool, "/next") == (200, b"fine")
    assert len(server.peers) == 2


async def test_upstream_answering_without_reading_a_large_streamed_body_is_delivered_and_dropped(
    serve: Serve, make_pool: MakePool
) -> None:
    """The upload fills the socket buffers (the upstream reads nothing after the head), and
    the answer must still get through, and the connection must then go, unwritten rest and all."""
    answered = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.read_request(body=False)
        peer.send(response(b"too large", status="413 Content Too Large"))
        await peer.drain()
        answered.set()
        await asyncio.Event().wait()  # never read again, never close: only the client can end it

    sent = 0

    async def large() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * 65536
        for _ in range(1024):  # 64 MiB: far more than the socket buffers hold
            if answered.is_set():
                await asyncio.sleep(0.01)  # the client's next piece comes slowly, the answer is in
            sent += len(chunk)
            yield chunk

    server = await serve(handle)
    pool = make_pool(server)
    upstream = await within(pool.request("POST", "/upload", [], large()))
    async with upstream:
        assert (upstream.status, await within(upstream.read())) == (413, b"too large")
        transport = upstream._connection.transport
    assert sent < 1024 * 65536
    assert transport is not None
    sock = transport.get_extra_info("socket")
    await eventually(lambda: sock.fileno() == -1)  # closed, although the upstream never took the rest of the buffer


async def test_upstream_that_takes_no_body_and_never_answers_is_a_read_timeout(
    serve: Serve, make_pool: MakePool
) -> None:
    """The upload fills the socket buffers and the upstream neither reads nor answers: the
    wait for it to take more is bounded by the read timeout, like the wait for an answer."""

    async def handle(peer: Peer) -> None:
        await peer.read_request(body=False)
        await asyncio.Event().wait()  # never read again, never answer

    async def large() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(1024):  # 64 MiB: far more than the socket buffers hold
            yield chunk

    server = await serve(handle)
    pool = make_pool(server)
    with pytest.raises(ReadTimeout, match="took no request body"):
        await within(pool.request("POST", "/upload", [], large(), read_timeout=0.5))


# --- flow control --------------------------------------------------------------------------


@pytest.mark.slow
async def test_large_response_read_slowly_is_buffered_up_to_about_the_high_water_mark(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_pool: MakePool
) -> None:
    size = 8 * 1024 * 1024
    pattern = bytes(range(256)) * 256  # 64 KiB

    async def download(request: web.Request) -> web.StreamResponse:
        stream = web.StreamResponse()
        stream.content_length = size
        await stream.prepare(request)
        for _ in range(size // len(pattern)):
            await stream.write(pattern)
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_get("/big", download)
    pool = make_pool(await aiohttp_server(app))
    upstream = await within(pool.request("GET", "/big", []))
    connection = upstream._connection
    async with upstream:
        await eventually(lambda: connection._paused)  # the client stops reading from the socket...
        digest = hashlib.sha256()
        most = received = 0
        async with asyncio.timeout(60):
            while chunk := await upstream.readany():
                most = max(most, connection._buffered + len(chunk))
                received += len(chunk)
                digest.update(chunk)
                await asyncio.sleep(0.001)  # ...a slow reader
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern * (size // len(pattern))).hexdigest()
    assert most <= _HIGH_WATER + 256 * 1024  # the high-water mark, plus at most one read from the socket


# --- response heads ------------------------------------------------------------------------


async def test_response_headers_keep_order_case_and_repeats(serve: Serve, make_pool: MakePool) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nx-lower: l\r\nX-UPPER: U\r\n"
        b"set-cookie: b=2; HttpOnly\r\nContent-Length: 2\r\n\r\nok"
    )
    pool = make_pool(await serve(answering(lambda request: head)))
    async with await within(pool.request("GET", "/", [])) as upstream:
        assert upstream.headers == [
            ("Set-Cookie", "a=1; Path=/"),
            ("x-lower", "l"),
            ("X-UPPER", "U"),
            ("set-cookie", "b=2; HttpOnly"),
            ("Content-Length", "2"),
        ]
        await upstream.read()


async def test_non_ascii_response_header_bytes_round_trip(serve: Serve, make_pool: MakePool) -> None:
    raw = b"caf\xc3\xa9 \xff\xfe"  # utf-8, then bytes that are not
    head = b"HTTP/1.1 200 OK\r\nX-Bytes: " + raw + b"\r\nContent-Length: 0\r\n\r\n"
    pool = make_pool(await serve(answering(lambda request: head)))
    async with await within(pool.request("GET", "/", [])) as upstream:
        name, value = upstream.headers[0]
        assert (name, value) == ("X-Bytes", "café \udcff\udcfe")
        assert value.encode("utf-8", "surrogateescape") == raw


async def test_reason_phrase_split_across_packets_is_kept_whole(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.send(b"HTTP/1.1 418 I'm a")
            await peer.drain()
            await asyncio.sleep(0.05)
            peer.send(b" teapot\r\nContent-Length: 0\r\n\r\n")

    pool = make_pool(await serve(handle))
    async with await within(pool.request("GET", "/", [])) as upstream:
        assert (upstream.status, upstream.reason) == (418, "I'm a teapot")


async def test_closing_a_response_twice_leaves_the_next_request_on_its_connection_alone(
    serve: Serve, make_pool: MakePool
) -> None:
    rest = asyncio.Event()

    async def handle(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/first":
                peer.send(response(b"first"))
                continue
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsec")
            await peer.drain()
            await rest.wait()
            peer.send(b"ond")

    server = await serve(handle)
    pool = make_pool(server)
    first = await within(pool.request("GET", "/first", []))
    assert await within(first.read()) == b"first"
    first.close()  # the connection goes back to the pool...
    async with await within(pool.request("GET", "/second", [])) as second:  # ...and is taken again
        first.close()  # a second close of the first response (say, its `async with` ending)
        rest.set()
        assert await within(second.read()) == b"second"
    assert len(server.peers) == 1


async def test_endless_response_head_is_an_invalid_response(serve: Serve, make_pool: MakePool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\n")
        try:
            for n in range(4096):  # 4 MiB of header lines, and no end to the head
                peer.send(b"X-Filler-%d: %s\r\n" % (n, b"x" * 1000))
                await peer.drain()
        except ConnectionError:  # the client gave up on the head and closed while it was being sent
            peer.client_closed.set()
            return
        await peer.until_client_closes()

    server = await serve(handle)
    pool = make_pool(server)
    with pytest.raises(InvalidResponse):
        await within(pool.request("GET", "/", []))
    await within((await server.peer(0)).client_closed.wait())


# --- the pool's origin ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "host_header"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1", "127.0.0.1:8080"),
        ("http://Example.COM", "example.com", "example.com"),
        ("https://example.com:443", "example.com", "example.com"),
        ("http://[::1]:8080", "::1", "[::1]:8080"),
        ("http://bücher.example:8080", "xn--bcher-kva.example", "xn--bcher-kva.example:8080"),
    ],
    ids=["IPv4 and port", "default http port", "default https port", "IPv6", "internationalized name"],
)
def test_pool_connects_to_and_names_the_origin_host_in_ascii(origin: str, host: str, host_header: str) -> None:
    pool = ConnectionPool(URL(origin))
    assert (pool.host, pool.host_header) == (host, host_header)


@pytest.mark.parametrize("origin", ["ftp://example.com", "http:///path-only", "unix:/run/app.sock"])
def test_pool_refuses_an_origin_that_is_not_http(origin: str) -> None:
    with pytest.raises(ValueError):
        ConnectionPool(URL(origin))
