"""Whole responses written in one step (gateway/response_writer.py): the same bytes aiohttp's own
response machinery writes, for every answer it takes; aiohttp's way for every one it does not;
and what aiohttp's writer does when the client is gone or reads slowly.

The gateway runs on the production runner, in front of a scripted upstream (each test controls
the proxied response to the byte). "aiohttp's way" is had by swapping ``write_whole`` for one
that declines everything, so the same gateway answers the same request both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

import gateway.server
from gateway.app import create_app
from gateway.config import load_text
from gateway.response_writer import write_whole
from tests.conftest import GatewayTestServer
from tests.rawhttp import read_raw_response
from tests.rawserver import Peer, RawServer, ServerRequest, answering

DATE = "Sun, 22 Nov 2026 06:00:00 GMT"
YAML = """
defaults: {{auth: none}}
services:
  svc: {{upstreams: ["{upstream}"]}}
  limited: {{upstreams: ["{upstream}"], rate_limit: {{requests: 100, per: 1m}}}}
  cached: {{upstreams: ["{upstream}"], cache: {{ttl: 30s}}}}
"""

Respond = Callable[[ServerRequest], bytes]


class ProductionServer(GatewayTestServer):
    """Run as ``gateway run`` runs it: a handler whose client went away is not cancelled (aiohttp's
    test server cancels it), so its answer still comes to be written."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs.pop("handler_cancellation", None)
        return await super()._make_runner(**kwargs)


def upstream_says(head: str, body: bytes = b"") -> Respond:
    return lambda request: head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


class Writes:
    """Counts ``write_whole``'s answers; ``declining`` makes every response go aiohttp's way."""

    def __init__(self) -> None:
        self.calls = 0
        self.written = 0
        self.declining = False

    async def __call__(self, protocol: object, request: object, response: web.Response) -> bool:
        if self.declining:
            return False
        self.calls += 1
        written = await write_whole(protocol, request, response)  # type: ignore[arg-type]
        self.written += written
        return written


class Gateway:
    def __init__(self, server: ProductionServer, upstream: RawServer, writes: Writes) -> None:
        self.server = server
        self.upstream = upstream
        self.writes = writes
        self._streams: list[asyncio.StreamWriter] = []

    async def connect(self, *, receive_buffer: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        self._streams.append(writer)
        return reader, writer

    async def ask(self, request: bytes, *, head_only: bool = False) -> bytes:
        """One request on a new connection; the whole response, byte for byte."""
        reader, writer = await self.connect()
        writer.write(request)
        return await read_raw_response(reader, 5, head_only=head_only)

    async def both_ways(self, request: bytes, *, head_only: bool = False) -> tuple[bytes, bytes, int]:
        """The response written by ``write_whole``, then aiohttp's, and how many it wrote."""
        self.writes.declining, before = False, self.writes.written
        whole = await self.ask(request, head_only=head_only)
        written = self.writes.written - before
        self.writes.declining = True
        try:
            aiohttps = await self.ask(request, head_only=head_only)
        finally:
            self.writes.declining = False
        return whole, aiohttps, written

    async def close(self) -> None:
        for writer in self._streams:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.close()
        await self.upstream.close()


MakeGateway = Callable[[Respond], Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeGateway]:
    started: list[Gateway] = []

    async def make(respond: Respond, *, handler: Callable[[Peer], Awaitable[None]] | None = None) -> Gateway:
        upstream = await RawServer(handler or answering(respond)).start()
        writes = Writes()
        monkeypatch.setattr(gateway.server, "write_whole", writes)
        server = ProductionServer(create_app(load_text(YAML.format(upstream=upstream.origin))))
        await server.start_server()
        started.append(Gateway(server, upstream, writes))
        return started[-1]

    yield make  # type: ignore[misc]
    for started_gateway in started:
        await started_gateway.close()


def get(target: str, headers: str = "", *, method: str = "GET", version: str = "1.1", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {target} HTTP/{version}\r\nHost: gw\r\n{headers}{length}\r\n".encode() + body


def masked(response: bytes) -> bytes:
    """Blank what differs between any two answers: the request id, and a Date aiohttp added."""
    response = re.sub(rb"X-Request-ID: [0-9a-f]{32}", b"X-Request-ID: *", response)
    response = re.sub(rb"request_id\": ?\"[0-9a-f]{32}\"", b"request_id: *", response)
    return re.sub(rb"Date: [^\r]+", b"Date: *", response)


# -- the same bytes ---------------------------------------------------------------------------

SHAPES = {
    "typical, repeated fields kept": upstream_says(
        f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 5\nDate: {DATE}\nServer: up\nX-Multi: one\n"
        'X-Multi: two\nETag: "v1"',
        b"hello",
    ),
    "no type, no server, no date (aiohttp adds them)": upstream_says("HTTP/1.1 200 OK\nContent-Length: 5", b"hello"),
    "empty body (no type added)": upstream_says(f"HTTP/1.1 200 OK\nContent-Length: 0\nDate: {DATE}"),
    "404 with its own reason and a lower-case field": upstream_says(
        f"HTTP/1.1 404 Nothing Here\nContent-Length: 4\nDate: {DATE}\nx-lower-case: kept", b"gone"
    ),
    "301 redirect": upstream_says(f"HTTP/1.1 301 Moved Permanently\nLocation: /b\nContent-Length: 0\nDate: {DATE}"),
    "a 64 KiB body": upstream_says(f"HTTP/1.1 200 OK\nContent-Length: 65536\nDate: {DATE}", b"x" * 65536),
}


@pytest.mark.parametrize("respond", SHAPES.values(), ids=SHAPES.keys())
async def test_a_proxied_answer_written_whole_is_byte_for_byte_aiohttps(
    make_gateway: MakeGateway, respond: Respond
) -> None:
    gateway = await make_gateway(respond)
    whole, aiohttps, written = await gateway.both_ways(get("/api/svc/a"))
    assert written == 1
    assert masked(whole) == masked(aiohttps)


OK = upstream_says(f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 2\nDate: {DATE}", b"ok")


async def test_the_middlewares_pending_headers_are_written_as_aiohttp_writes_them(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(OK)
    whole, aiohttps, written = await gateway.both_ways(get("/api/limited/a"))
    assert written == 1
    assert b"\r\nX-RateLimit-Limit: 100\r\n" in whole
    budget = rb"Remaining: \d+|Reset: \d+|r=\d+|t=\d+"  # one request later, one less
    assert masked(re.sub(budget, b"*", whole)) == masked(re.sub(budget, b"*", aiohttps))


async def test_a_cache_hit_replayed_by_the_chain_is_written_as_aiohttp_writes_it(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(OK)
    await gateway.ask(get("/api/cached/a"))  # stored
    probe = "X-Probe: 1\r\n"  # a field the hit lane does not know: the full chain answers
    whole, aiohttps, written = await gateway.both_ways(get("/api/cached/a", probe))
    assert written == 1
    assert b"X-Cache: HIT" in whole
    assert masked(re.sub(rb"Age: \d+|ttl=\d+", b"*", whole)) == masked(re.sub(rb"Age: \d+|ttl=\d+", b"*", aiohttps))


async def test_a_problem_the_gateway_answers_itself_is_written_as_aiohttp_writes_it(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(OK)
    whole, aiohttps, written = await gateway.both_ways(get("/api/nope/a"))
    assert written == 1
    assert whole.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"application/problem+json" in whole
    assert masked(whole) == masked(aiohttps)


async def test_an_answer_to_a_post_is_written_as_aiohttp_writes_it(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(upstream_says(f"HTTP/1.1 201 Created\nContent-Length: 7\nDate: {DATE}", b"created"))
    whole, aiohttps, written = await gateway.both_ways(get("/api/svc/a", method="POST", body=b"{}"))
    assert written == 1
    assert masked(whole) == masked(aiohttps)


async def test_pipelined_requests_are_each_answered_whole_in_order(make_gateway: MakeGateway) -> None:
    def echo_target(request: ServerRequest) -> bytes:
        target = request.target.encode()
        return f"HTTP/1.1 200 OK\r\nContent-Length: {len(target)}\r\nDate: {DATE}\r\n\r\n".encode() + target

    gateway = await make_gateway(echo_target)
    reader, writer = await gateway.connect()
    writer.write(b"".join(get(f"/api/svc/{n}") for n in range(5)))
    bodies = [(await read_raw_response(reader, 5)).rpartition(b"\r\n\r\n")[2] for _ in range(5)]
    assert bodies == [f"/{n}".encode() for n in range(5)]
    assert gateway.writes.written == 5


# -- aiohttp's way --------------------------------------------------------------------------------

DECLINED = {
    "HEAD (no body)": (OK, get("/api/svc/a", method="HEAD"), True),
    "HTTP/1.0": (OK, get("/api/svc/a", version="1.0"), False),
    "the client asks to close": (OK, get("/api/svc/a", "Connection: close\r\n"), False),
    "204 (no body)": (upstream_says(f"HTTP/1.1 204 No Content\nDate: {DATE}"), get("/api/svc/a"), True),
    "chunked from upstream (streamed)": (
        upstream_says(f"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nDate: {DATE}", b"2\r\nok\r\n0\r\n\r\n"),
        get("/api/svc/a"),
        False,
    ),
}


@pytest.mark.parametrize(("respond", "request_bytes", "head_only"), DECLINED.values(), ids=DECLINED.keys())
async def test_an_answer_it_does_not_handle_goes_aiohttps_way_unchanged(
    make_gateway: MakeGateway, respond: Respond, request_bytes: bytes, head_only: bool
) -> None:
    gateway = await make_gateway(respond)
    whole, aiohttps, written = await gateway.both_ways(request_bytes, head_only=head_only)
    assert written == 0
    assert masked(whole) == masked(aiohttps)


# -- a client that is gone, or slow -----------------------------------------------------------------


async def test_a_client_gone_before_its_answer_ends_its_connection_quietly(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow_upstream(peer: Peer) -> None:
        while await peer.read_request() is not None:
            asked.set()
            await answer.wait()
            peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: {DATE}\r\n\r\nok".encode())
            await peer.drain()

    gateway = await make_gateway(OK, handler=slow_upstream)
    _, writer = await gateway.connect()
    writer.write(get("/api/svc/a"))
    await asked.wait()
    writer.close()  # the client gives up while the upstream is still working
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.ERROR):
        answer.set()
        await asyncio.sleep(0.2)
    assert (gateway.writes.calls, gateway.writes.written) == (1, 0)  # it raised instead of writing
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    again = await gateway.ask(get("/api/svc/a"))  # and the gateway serves on
    assert again.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_client_that_does_not_read_stops_the_answers_until_it_does(make_gateway: MakeGateway) -> None:
    body = b"x" * 60_000
    gateway = await make_gateway(upstream_says(f"HTTP/1.1 200 OK\nContent-Length: {len(body)}\nDate: {DATE}", body))
    reader, writer = await gateway.connect(receive_buffer=64 * 1024)
    sent = 200  # 12 MB of answers: far more than the socket buffers hold
    writer.write(b"".join(get(f"/api/svc/{n}") for n in range(sent)))

    def asked() -> int:
        return sum(len(peer.requests) for peer in gateway.upstream.peers)

    seen = -1
    while asked() != seen:  # until the gateway stops asking the upstream for more
        seen = asked()
        await asyncio.sleep(0.3)
    assert seen < sent  # it waits for the client instead of buffering every answer
    for _ in range(sent):
        response = await read_raw_response(reader, 5)
        assert response.endswith(body)
    assert asked() == sent
    assert gateway.writes.written == sent
