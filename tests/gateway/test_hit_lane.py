"""The hit lane (gateway/hit_lane.py): a fresh memory-store hit answered from the parsed request
head gives exactly what the full chain gives, and every request it is not sure of goes the
full way. The gateway runs on the production runner; the upstream is a scripted raw server,
so each test controls the stored response to the byte.

"Through the lane" and "the full way" are told apart by ``HitLane.answered``; a request is sent
the full way on purpose with a header the lane does not know (``X-Probe``), which changes
nothing else about its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import re
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from gateway.access_log import LineBatcher
from gateway.app import HIT_LANE, STORE, RouteHolder, create_app
from gateway.config import load_text
from gateway.hit_lane import HitLane
from gateway.metrics import METRICS
from gateway.reload import Reloader
from middleware._cache_key import Entry
from middleware.cache import purge
from middleware.request_id import RequestIdMiddleware
from tests.conftest import GatewayTestServer
from tests.rawhttp import read_raw_response
from tests.rawserver import RawServer, ServerRequest, answering

DATE = "Sun, 22 Nov 2026 06:00:00 GMT"
SECRET = "s" * 32
YAML = """
jwt: {{secret: "${{JWT_SECRET}}"}}
trusted_proxies: ["127.0.0.1/32"]
defaults: {{auth: none}}
services:
  svc: {{upstreams: ["{upstream}"], cache: {{ttl: 30s}}}}
  limited: {{upstreams: ["{upstream}"], cache: {{ttl: 30s}}, rate_limit: {{requests: 100, per: 1m}}}}
  optional: {{upstreams: ["{upstream}"], cache: {{ttl: 30s}}, auth: optional}}
  stale: {{upstreams: ["{upstream}"], cache: {{ttl: 1s, stale_while_revalidate: 1m}}}}
"""


class Gateway:
    """A gateway on the production runner in front of a scripted upstream, with its access log."""

    def __init__(self, server: GatewayTestServer, upstream: RawServer, log: io.BytesIO) -> None:
        self.server = server
        self.upstream = upstream
        self._log = log
        self.connections: list[Connection] = []

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def answered(self) -> int:
        return self.app[HIT_LANE].answered

    def access_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self._log.getvalue().splitlines()]

    async def connect(self, *, sock: socket.socket | None = None) -> Connection:
        if sock is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        self.connections.append(Connection(reader, writer))
        return self.connections[-1]


class Connection:
    """One kept-alive client connection speaking raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def get(self, target: str, headers: str = "", *, method: str = "GET", version: str = "1.1") -> bytes:
        self.send(f"{method} {target} HTTP/{version}\r\nHost: gw\r\n{headers}\r\n".encode())
        return await self.response(head_only=method == "HEAD")

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head_only: bool = False) -> bytes:
        """One whole response, byte for byte."""
        return await read_raw_response(self.reader, 5, head_only=head_only)

    async def closed_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Respond = Callable[[ServerRequest], bytes]
MakeGateway = Callable[[Respond], Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    started: list[Gateway] = []

    async def make(respond: Respond) -> Gateway:
        upstream = await RawServer(answering(respond)).start()
        log = io.BytesIO()
        config = load_text(YAML.format(upstream=upstream.origin), env={"JWT_SECRET": SECRET})
        server = GatewayTestServer(create_app(config, access_log=LineBatcher(log)))
        await server.start_server()
        started.append(Gateway(server, upstream, log))
        return started[-1]

    yield make
    for gateway in started:
        for connection in gateway.connections:
            await connection.close()
        await gateway.server.close()
        await gateway.upstream.close()


def upstream_says(head: str, body: bytes = b"") -> Respond:
    """An upstream answering every request with ``head`` (status line and fields) and ``body``."""
    return lambda request: head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


TYPICAL = upstream_says(
    f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 5\nDate: {DATE}\nServer: up\nX-Multi: one\n"
    'X-Multi: two\nETag: "v1"',
    b"hello",
)


def masked(response: bytes) -> bytes:
    """A response with what differs between any two hits blanked: request id, Age, ttl."""
    response = re.sub(rb"X-Request-ID: [0-9a-f]{32}", b"X-Request-ID: *", response)
    return re.sub(rb"Age: \d+|ttl=\d+", b"*", response)


async def fill(connection: Connection, target: str) -> None:
    miss = await connection.get(target)
    assert b"X-Cache: MISS" in miss and b"Cache-Status: gateway; fwd=miss; stored" in miss


async def filled(make_gateway: MakeGateway, target: str, respond: Respond = TYPICAL) -> tuple[Gateway, Connection]:
    """A gateway in front of ``respond``, and a connection on which ``target`` was just stored."""
    gateway = await make_gateway(respond)
    connection = await gateway.connect()
    await fill(connection, target)
    return gateway, connection


# -- the same answer ------------------------------------------------------------------------


SHAPES = {
    "typical": TYPICAL,
    "chunked, no length": upstream_says(
        f"HTTP/1.1 200 OK\nContent-Type: text/plain\nTransfer-Encoding: chunked\nDate: {DATE}",
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    "no type, no server": upstream_says(f"HTTP/1.1 200 OK\nContent-Length: 5\nDate: {DATE}", b"hello"),
    "empty body": upstream_says(f"HTTP/1.1 200 OK\nContent-Length: 0\nDate: {DATE}"),
    "404 with its own reason": upstream_says(
        f"HTTP/1.1 404 Nothing Here\nContent-Length: 4\nDate: {DATE}\nx-lower-case: kept", b"gone"
    ),
    "301 redirect": upstream_says(f"HTTP/1.1 301 Moved Permanently\nLocation: /b\nContent-Length: 0\nDate: {DATE}"),
}


@pytest.mark.parametrize("respond", SHAPES.values(), ids=SHAPES.keys())
async def test_a_lane_hit_is_byte_for_byte_the_full_chains_hit(make_gateway: MakeGateway, respond: Respond) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a?x=1", respond)
    through_lane = await connection.get("/api/svc/a?x=1")
    assert gateway.answered == 1
    the_full_way = await connection.get("/api/svc/a?x=1", "X-Probe: 1\r\n")
    assert gateway.answered == 1
    assert b"X-Cache: HIT" in through_lane
    assert masked(through_lane) == masked(the_full_way)
    assert len(gateway.upstream.peers[0].requests) == 1


DECLINED_ENTRIES = {
    "no Date (aiohttp adds the current one)": upstream_says("HTTP/1.1 200 OK\nContent-Length: 2", b"ok"),
    "204 (no body, framing dropped)": upstream_says(f"HTTP/1.1 204 No Content\nDate: {DATE}"),
    "a field the hit sets itself": upstream_says(
        f"HTTP/1.1 200 OK\nContent-Length: 2\nDate: {DATE}\nX-Cache: up", b"ok"
    ),
}


@pytest.mark.parametrize("respond", DECLINED_ENTRIES.values(), ids=DECLINED_ENTRIES.keys())
async def test_an_entry_the_lane_cannot_write_exactly_is_replayed_the_full_way(
    make_gateway: MakeGateway, respond: Respond
) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a", respond)
    hit = await connection.get("/api/svc/a")
    assert b"X-Cache: HIT" in hit
    assert gateway.answered == 0


def test_a_clients_first_request_on_a_new_connection_is_answered_too() -> None:
    # curl's way: connect, send at once, one request a connection. On uvloop (the production
    # loop) the request can be read before aiohttp's connection loop has started at all; the
    # lane answers it then too. The client writes before the gateway's loop runs, so that order
    # is certain here.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> int:
        upstream = await RawServer(answering(TYPICAL)).start()
        config = load_text(YAML.format(upstream=upstream.origin), env={"JWT_SECRET": SECRET})
        app = create_app(config, access_log=LineBatcher(io.BytesIO()))
        server = GatewayTestServer(app)
        await server.start_server()
        try:
            for n in range(4):
                sock = socket.create_connection(("127.0.0.1", server.port))  # blocking: before the loop looks
                sock.sendall(b"GET /api/svc/a HTTP/1.1\r\nHost: gw\r\n\r\n")
                sock.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=sock)
                answer = await Connection(reader, writer).response()
                assert (b"X-Cache: MISS" if n == 0 else b"X-Cache: HIT") in answer
                writer.close()
                await writer.wait_closed()
            return app[HIT_LANE].answered
        finally:
            await server.close()
            await upstream.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == 3


async def test_the_access_log_line_and_metrics_are_the_full_chains(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a?x=1")
    await connection.get("/api/svc/a?x=1")
    await connection.get("/api/svc/a?x=1", "X-Probe: 1\r\n")
    assert gateway.answered == 1
    await asyncio.sleep(0)  # the access log is written once per loop turn
    _miss, lane, full = gateway.access_lines()
    varying = ("time", "request_id", "duration_ms")
    assert {k: v for k, v in lane.items() if k not in varying} == {k: v for k, v in full.items() if k not in varying}
    assert lane["cache"] == "HIT" and lane["path"] == "/api/svc/a" and lane["service"] == "svc"
    assert lane["client"] == "127.0.0.1" and lane["status"] == 200 and isinstance(lane["duration_ms"], float)
    metrics = gateway.app[METRICS]
    metrics.fold()
    snapshot = metrics.snapshot()
    assert snapshot.total("gateway_requests_total", service="svc", method="GET", status="200") == 3
    assert snapshot.total("gateway_cache_total", result="hit") == 2
    assert snapshot.total("gateway_request_duration_seconds_count", service="svc") == 3


async def test_a_sane_request_id_is_echoed_and_logged_and_an_insane_one_replaced(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    sane = await connection.get("/api/svc/a", "X-Request-ID: trace-42\r\n")
    insane = await connection.get("/api/svc/a", "X-Request-ID: no spaces allowed\r\n")
    assert gateway.answered == 2
    assert b"\r\nX-Request-ID: trace-42\r\n" in sane
    assert re.search(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n", insane)
    await asyncio.sleep(0)
    assert gateway.access_lines()[1]["request_id"] == "trace-42"


async def test_the_client_address_honours_trusted_proxies(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    await connection.get("/api/svc/a", "X-Forwarded-For: 203.0.113.9\r\n")
    await connection.get("/api/svc/a", "X-Forwarded-For: 203.0.113.9\r\nX-Probe: 1\r\n")
    assert gateway.answered == 1
    await asyncio.sleep(0)
    lane, full = gateway.access_lines()[1:]
    assert lane["client"] == full["client"] == "203.0.113.9"  # the peer, 127.0.0.1, is a trusted proxy


# -- what goes the full way ------------------------------------------------------------------


FULL_WAY = {
    "Authorization on an auth: none route": ("/api/svc/a", "Authorization: Bearer x\r\n", b"X-Cache: BYPASS"),
    "request Cache-Control": ("/api/svc/a", "Cache-Control: no-cache\r\n", b"X-Cache: MISS"),
    "Pragma (not a header the lane knows)": ("/api/svc/a", "Pragma: no-cache\r\n", b"X-Cache: HIT"),
    "a conditional": ("/api/svc/a", 'If-None-Match: "v1"\r\n', b"X-Cache: HIT"),
    "Connection: close": ("/api/svc/a", "Connection: close\r\n", b"X-Cache: HIT"),
    "a rate-limited route": ("/api/limited/a", "", b"X-RateLimit-Remaining: 98"),
    "an auth: optional route": ("/api/optional/a", "", b"X-Cache: HIT"),
    "an unsafe path": ("/api/svc/%2e%2e/%2e%2e/etc", "", b"400 Bad Request"),
}


@pytest.mark.parametrize(("target", "headers", "expected"), FULL_WAY.values(), ids=FULL_WAY.keys())
async def test_requests_the_lane_is_not_sure_of_go_the_full_way(
    make_gateway: MakeGateway, target: str, headers: str, expected: bytes
) -> None:
    gateway = await make_gateway(TYPICAL)
    connection = await gateway.connect()
    if not target.startswith("/api/svc/%"):
        await fill(connection, target)
    answer = await connection.get(target, headers)
    assert expected in answer
    assert gateway.answered == 0


async def test_head_and_http_1_0_go_the_full_way(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    head = await connection.get("/api/svc/a", method="HEAD")
    assert b"X-Cache: HIT" in head
    old = await connection.get("/api/svc/a", "Connection: keep-alive\r\n", version="1.0")
    assert old.startswith(b"HTTP/1.0 200 OK") and b"X-Cache: HIT" in old and old.endswith(b"hello")
    assert gateway.answered == 0


async def test_a_stale_entry_is_revalidated_the_full_way(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/stale/a")
    assert b"X-Cache: HIT" in await connection.get("/api/stale/a")
    assert gateway.answered == 1
    await asyncio.sleep(1.1)
    assert b"X-Cache: STALE" in await connection.get("/api/stale/a")
    assert gateway.answered == 1


async def test_pipelined_requests_go_the_full_way_in_order(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    connection.send(b"GET /api/svc/a HTTP/1.1\r\nHost: gw\r\n\r\nGET /api/svc/b HTTP/1.1\r\nHost: gw\r\n\r\n")
    first, second = await connection.response(), await connection.response()
    assert b"X-Cache: HIT" in first and b"X-Cache: MISS" in second
    assert gateway.answered == 0


async def test_a_purge_and_a_write_are_seen_by_the_next_lane_lookup(make_gateway: MakeGateway) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    assert b"X-Cache: HIT" in await connection.get("/api/svc/a")
    await purge(gateway.app[STORE], service="svc")
    assert b"X-Cache: MISS" in await connection.get("/api/svc/a")
    assert b"X-Cache: HIT" in await connection.get("/api/svc/a")
    connection.send(b"DELETE /api/svc/a HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    await connection.response()
    assert b"X-Cache: MISS" in await connection.get("/api/svc/a")
    assert gateway.answered == 2  # the two hits; after the purge and after the DELETE, misses


# -- the connection ---------------------------------------------------------------------------


async def test_the_keep_alive_timeout_counts_from_the_last_lane_answer(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(TYPICAL)
    gateway.server.runner.server._kwargs["keepalive_timeout"] = 0.6  # type: ignore[union-attr]
    connection = await gateway.connect()
    await fill(connection, "/api/svc/a")
    for _ in range(6):  # 1.2 s of hits, each well within the keep-alive timeout of the one before
        await asyncio.sleep(0.2)
        assert b"X-Cache: HIT" in await connection.get("/api/svc/a")
    assert gateway.answered == 6
    assert await connection.closed_within(2.0)  # then idle: closed by the keep-alive timer


async def test_a_client_that_is_not_reading_gets_its_answers_through_aiohttps_flow_control(
    make_gateway: MakeGateway,
) -> None:
    big = b"x" * (512 * 1024)
    gateway = await make_gateway(upstream_says(f"HTTP/1.1 200 OK\nContent-Length: {len(big)}\nDate: {DATE}", big))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small windows both ways: an answer cannot
    sock.setblocking(False)  # pass at once, and waits in the gateway's write buffer
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.server.port))
    connection = await gateway.connect(sock=sock)
    await fill(connection, "/api/svc/a")
    assert gateway.server.runner is not None and gateway.server.runner.server is not None
    (protocol,) = gateway.server.runner.server.connections
    assert protocol.transport is not None
    protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    connection.send(b"GET /api/svc/a HTTP/1.1\r\nHost: gw\r\n\r\n")
    await asyncio.sleep(0.3)  # answered by the lane; most of it still waits in the gateway's buffer
    assert gateway.answered == 1 and protocol.transport.get_write_buffer_size() > 0
    connection.send(b"GET /api/svc/a HTTP/1.1\r\nHost: gw\r\n\r\n")
    await asyncio.sleep(0.3)
    first, second = await connection.response(), await connection.response()
    assert first.endswith(big) and second.endswith(big)
    assert b"X-Cache: HIT" in first and b"X-Cache: HIT" in second
    assert gateway.answered == 1  # the second went the full way, after the first had drained


async def test_a_reload_that_adds_a_rate_limit_closes_the_lane_for_that_route(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    await connection.get("/api/svc/a")
    assert gateway.answered == 1
    limited = YAML.format(upstream=gateway.upstream.origin).replace("${JWT_SECRET}", SECRET)
    path = tmp_path / "routes.yaml"
    path.write_text(limited.replace("svc: {upstreams", "svc: {rate_limit: {requests: 5, per: 1m}, upstreams"))
    assert await Reloader(gateway.app, path).reload("test")
    answer = await connection.get("/api/svc/a")
    assert b"X-Cache: HIT" in answer and b"X-RateLimit-Remaining: 4" in answer
    assert gateway.answered == 1


async def test_the_lane_is_closed_while_no_route_could_use_it_and_opens_again_on_reload(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")
    lane = gateway.app[HIT_LANE]
    assert lane.open
    yaml = YAML.format(upstream=gateway.upstream.origin).replace("${JWT_SECRET}", SECRET)
    path = tmp_path / "routes.yaml"
    path.write_text(
        yaml.replace("defaults: {auth: none}", "defaults: {auth: none, rate_limit: {requests: 5, per: 1m}}")
    )
    assert await Reloader(gateway.app, path).reload("test")
    assert not lane.open  # every route is rate limited: the server no longer offers requests to the lane
    answer = await connection.get("/api/svc/a")
    assert b"X-Cache: HIT" in answer and b"X-RateLimit-Remaining: 4" in answer
    path.write_text(yaml)
    assert await Reloader(gateway.app, path).reload("test")
    assert lane.open
    assert b"X-Cache: HIT" in await connection.get("/api/svc/a")
    assert gateway.answered == 1


async def test_a_failing_lane_costs_the_request_nothing(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, connection = await filled(make_gateway, "/api/svc/a")

    def broken(*args: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.app[HIT_LANE], "answer", broken)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        hit = await connection.get("/api/svc/a")
    assert hit.startswith(b"HTTP/1.1 200 OK") and b"X-Cache: HIT" in hit and hit.endswith(b"hello")
    assert [r.getMessage() for r in caplog.records if r.name == "gateway"] == [
        "the hit lane failed on GET /api/svc/a; the request goes through the full chain"
    ]
    assert b"X-Cache: HIT" in await connection.get("/api/svc/a")  # the connection serves on


def test_the_heads_the_lane_remembers_hold_at_most_8_mib_of_entries() -> None:
    lane = HitLane(RouteHolder(), RequestIdMiddleware())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(40):  # 20 MiB of entries, each rendered once and then dropped by the cache
            body = bytes([n]) * (512 * 1024)
            entry = Entry(200, "OK", [("Date", DATE)], body, stored=0.0, age=0.0, fresh=60.0, stale=0.0)
            assert lane._head(entry) is not None
            del entry, body
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= 8 * 1024 * 1024 + 256 * 1024  # the bound, and a little for the memory's own dict
