"""The WebSocket relay through a real gateway to real upstreams (DESIGN §7), with aiohttp's
and the ``websockets`` library's clients."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import jwt
import pytest
import websockets
from aiohttp import WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from websockets.asyncio.client import connect

from gateway.websocket import OPEN_RELAYS
from tests.backends import BACKEND_STATE
from tests.conftest import JWT_TEST_SECRET, REFUSED, GatewayClient, MakeGateway, upstream

# -- an upstream that shows what it received and does what it is told --------------------


@dataclass
class Seen:
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # raw path, lower-cased headers
    closes: list[tuple[int | None, str]] = field(default_factory=list)  # the close each socket got (None: abrupt)
    pings: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


SEEN = web.AppKey("seen", Seen)


async def _socket(request: web.Request) -> web.StreamResponse:
    """Echoes; text commands: ``close <code> <reason>``, ``abort``, ``ping <data>``, ``big <n>``,
    ``deaf`` (reads nothing more, so answers no ping, until the connection is gone)."""
    seen = request.app[SEEN]
    seen.requests.append((request.raw_path, {k.lower(): v for k, v in request.headers.items()}))
    ws = web.WebSocketResponse(protocols=("chat", "echo"), autoping=False, autoclose=False, max_msg_size=0)
    await ws.prepare(request)
    try:
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                seen.texts.append(message.data)
                command, _, argument = message.data.partition(" ")
                if command == "close":
                    code, _, reason = argument.partition(" ")
                    await ws.close(code=int(code), message=reason.encode())
                    return ws
                if command == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    return ws
                if command == "deaf":
                    for _ in range(100):
                        if request.transport is None or request.transport.is_closing():
                            break
                        await asyncio.sleep(0.05)
                    return ws
                if command == "ping":
                    await ws.ping(argument.encode())
                elif command == "big":
                    await ws.send_bytes(b"x" * int(argument))
                else:
                    await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            elif message.type is WSMsgType.PING:
                seen.pings.append(message.data)
                await ws.pong(message.data)
            elif message.type is WSMsgType.PONG:
                await ws.send_str(f"pong {message.data.decode()}")
            elif message.type is WSMsgType.CLOSE:
                seen.closes.append((message.data, message.extra or ""))
                await ws.close(code=message.data, message=(message.extra or "").encode())  # the echo
                return ws
            else:
                seen.closes.append((None, message.type.name))
                return ws
    finally:
        seen.closed.set()


async def _with_fields(request: web.Request) -> web.StreamResponse:
    """Accepts with fields of its own on the 101: two cookies, a field, and one named hop-by-hop."""
    ws = web.WebSocketResponse()
    ws.headers.add("Set-Cookie", "a=1; Path=/")
    ws.headers.add("Set-Cookie", "b=2; Path=/")
    ws.headers["X-Upstream"] = "yes"
    ws.headers["Keep-Alive"] = "timeout=5"
    await ws.prepare(request)
    await ws.receive()
    return ws


async def _refuse(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["status"]), text="no\n", headers={"Retry-After": "7"})


async def _slow_socket(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(0.5)  # the handshake takes a while: time for the client to leave
    return await _socket(request)


async def _hang(request: web.Request) -> web.Response:
    await asyncio.sleep(0.5)
    return web.Response(text="late\n")


@pytest.fixture
async def ws_upstream(aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app[SEEN] = Seen()
    app.router.add_get("/ws", _socket)
    app.router.add_get("/ws/{tail:.*}", _socket)
    app.router.add_get("/fields", _with_fields)
    app.router.add_get("/refuse/{status}", _refuse)
    app.router.add_get("/hang", _hang)
    app.router.add_get("/slow", _slow_socket)
    return await aiohttp_server(app)


def seen(server: TestServer) -> Seen:
    return server.app[SEEN]


# -- gateways ------------------------------------------------------------------------------


def routes(target: str, websocket: str = "true", *, auth: str = "none", timeouts: str = "") -> str:
    jwt_section = "jwt:\n  secret: ${JWT_SECRET}\n  claims_headers: {sub: X-User-Id}\n" if auth != "none" else ""
    return (
        f"{jwt_section}defaults: {{auth: {auth}{timeouts}}}\n"
        f'services:\n  ws:\n    upstreams: ["{target}"]\n    websocket: {websocket}\n'
    )


@pytest.fixture
async def gateway(make_gateway: MakeGateway, ws_upstream: TestServer) -> GatewayClient:
    return await make_gateway(routes(upstream(ws_upstream), "{max_message: 2MiB, messages_per_second: 100000}"))


def token(sub: str = "alice", *, ttl: float = 600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, JWT_TEST_SECRET, algorithm="HS256")


def ws_url(gateway: GatewayClient, path: str) -> str:
    return f"ws://127.0.0.1:{gateway.port}{path}"


async def receive(ws: aiohttp.ClientWebSocketResponse[Literal[True]], within: float = 5.0) -> aiohttp.WSMessage:
    return await ws.receive(timeout=within)


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- relaying ------------------------------------------------------------------------------


async def test_text_and_binary_arrive_in_order(gateway: GatewayClient) -> None:
    async with gateway.ws_connect("/api/ws/ws") as ws:
        for i in range(200):
            await (ws.send_str(f"text {i}") if i % 2 else ws.send_bytes(i.to_bytes(2, "big")))
        received = [(await receive(ws)).data for _ in range(200)]
    assert received == [f"text {i}" if i % 2 else i.to_bytes(2, "big") for i in range(200)]


async def test_one_mib_messages_both_ways_with_websockets(gateway: GatewayClient) -> None:
    blob, text = os.urandom(1024 * 1024), "é" * (512 * 1024)
    async with connect(ws_url(gateway, "/api/ws/ws"), max_size=4 * 1024 * 1024) as ws:
        await ws.send(blob)
        await ws.send(text)
        assert await ws.recv() == blob
        assert await ws.recv() == text


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        pytest.param(["x-unknown", "echo"], "echo", id="the one the upstream speaks"),
        pytest.param(["echo", "chat"], "echo", id="the client's order"),
        pytest.param(["x-unknown"], None, id="none in common"),
        pytest.param([], None, id="none offered"),
    ],
)
async def test_subprotocol_is_the_one_the_upstream_chose(
    gateway: GatewayClient, ws_upstream: TestServer, offered: list[str], chosen: str | None
) -> None:
    async with gateway.ws_connect("/api/ws/ws", protocols=offered) as ws:
        assert ws.protocol == chosen
    offered_upstream = seen(ws_upstream).requests[-1][1].get("sec-websocket-protocol")
    assert offered_upstream == (",".join(offered) or None)


async def test_offered_subprotocols_log_no_warning(gateway: GatewayClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        async with gateway.ws_connect("/api/ws/ws", protocols=["x-unknown", "echo"]) as ws:
            assert ws.protocol == "echo"
    assert [r.getMessage() for r in caplog.records if r.name == "aiohttp.websocket"] == []


async def test_subprotocol_with_websockets(gateway: GatewayClient) -> None:
    async with connect(ws_url(gateway, "/api/ws/ws"), subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"


async def test_fields_of_the_upstreams_101_reach_the_client_less_hop_by_hop(gateway: GatewayClient) -> None:
    async with gateway.ws_connect("/api/ws/fields") as ws:
        headers = ws._response.headers
        assert headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert headers["X-Upstream"] == "yes"
        assert "Keep-Alive" not in headers
        assert len(headers.getall("Sec-WebSocket-Accept")) == 1
        assert len(headers.getall("Date")) == 1


async def test_client_close_code_and_reason_reach_the_upstream(gateway: GatewayClient, ws_upstream: TestServer) -> None:
    async with gateway.ws_connect("/api/ws/ws") as ws:
        await ws.send_str("hi")
        await receive(ws)
        await ws.close(code=4001, message=b"bye now")
        assert ws.close_code == 4001  # the upstream's echo, relayed back
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).closes == [(4001, "bye now")]


async def test_upstream_close_code_and_reason_reach_the_client(gateway: GatewayClient) -> None:
    async with connect(ws_url(gateway, "/api/ws/ws")) as ws:
        await ws.send("close 4002 done here")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "done here")


async def test_pings_and_pongs_are_relayed_both_ways(gateway: GatewayClient, ws_upstream: TestServer) -> None:
    async with gateway.ws_connect("/api/ws/ws", autoping=False) as ws:
        await ws.ping(b"from-client")
        message = await receive(ws)
        assert (message.type, message.data) == (WSMsgType.PONG, b"from-client")  # the upstream's pong
        assert seen(ws_upstream).pings == [b"from-client"]
        await ws.send_str("ping from-upstream")
        message = await receive(ws)
        assert (message.type, message.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(message.data)
        assert (await receive(ws)).data == "pong from-upstream"
        await ws.ping(b"")  # empty, as aiohttp's heartbeat sends them
        message = await receive(ws)
        assert (message.type, message.data) == (WSMsgType.PONG, b"")


async def test_plain_requests_to_a_websocket_service_are_proxied(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/ws/refuse/200")
    assert (response.status, await response.text()) == (200, "no\n")


# -- refusals before the upgrade ---------------------------------------------------------------


async def _refusal(gateway: GatewayClient, path: str) -> tuple[int, dict[str, object], str]:
    """Status, problem body and content type of a refused upgrade, read as plain HTTP."""
    with pytest.raises(WSServerHandshakeError) as refused:
        await gateway.ws_connect(path)
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    response = await gateway.get(path, headers=headers)
    assert response.status == refused.value.status
    return response.status, await response.json(content_type=None), response.content_type


async def test_upgrade_without_token_is_a_401_problem_and_no_socket(
    make_gateway: MakeGateway, ws_upstream: TestServer
) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), auth="required"))
    status, body, content_type = await _refusal(gateway, "/api/ws/ws")
    assert (status, content_type, body["status"]) == (401, "application/problem+json", 401)
    status, _, _ = await _refusal(gateway, f"/api/ws/ws?access_token={token()}x")
    assert status == 401
    assert seen(ws_upstream).requests == []


@pytest.mark.parametrize("status", [403, 404, 503])
async def test_upstream_refusal_status_is_passed_on(gateway: GatewayClient, status: int) -> None:
    code, body, content_type = await _refusal(gateway, f"/api/ws/refuse/{status}")
    assert (code, content_type, body["status"]) == (status, "application/problem+json", status)


async def test_upstream_refusal_keeps_retry_after(gateway: GatewayClient) -> None:
    with pytest.raises(WSServerHandshakeError) as refused:
        await gateway.ws_connect("/api/ws/refuse/503")
    assert refused.value.headers is not None and refused.value.headers["Retry-After"] == "7"


async def test_unreachable_upstream_is_502(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(routes(REFUSED))
    status, body, _ = await _refusal(gateway, "/api/ws/ws")
    assert status == 502 and "could be reached" in str(body["detail"])


async def test_slow_upstream_handshake_is_504(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), timeouts=", timeout: 100ms, connect_timeout: 100ms"))
    with pytest.raises(WSServerHandshakeError) as refused:
        await gateway.ws_connect("/api/ws/hang")
    assert refused.value.status == 504


async def test_upgrade_that_is_not_a_websocket_handshake_is_400(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/ws/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert (response.status, response.content_type) == (400, "application/problem+json")


async def test_upgrade_to_a_service_without_websocket_is_400(make_gateway: MakeGateway, backend: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(backend), "off"))
    with pytest.raises(WSServerHandshakeError) as refused:
        await gateway.ws_connect("/api/ws/ws-echo")
    assert refused.value.status == 400
    assert backend.app[BACKEND_STATE].requests == []


# -- tokens ------------------------------------------------------------------------------------


async def test_access_token_is_removed_before_forwarding_and_never_logged(
    make_gateway: MakeGateway, backend: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make_gateway(routes(upstream(backend), auth="required"))
    secret = token("bob")
    with caplog.at_level(logging.DEBUG):
        async with gateway.ws_connect(f"/api/ws/ws-echo?room=a&access_token={secret}&b=%20") as ws:
            await ws.send_str("hello")
            assert (await receive(ws)).data == "hello"
        await eventually(lambda: "bob" in caplog.text)  # the access log line, written when the socket is done
    forwarded = backend.app[BACKEND_STATE].requests[-1]
    assert forwarded.raw_path == "/ws-echo?room=a&b=%20"
    headers = {name.lower(): value for name, value in forwarded.headers}
    assert headers["x-user-id"] == "bob"
    assert secret not in caplog.text


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        pytest.param("?access_token=x", "/ws", id="the only parameter"),
        pytest.param("?a=1&access_token=x&access_token=y&b=%20", "/ws?a=1&b=%20", id="every copy, the rest as sent"),
        pytest.param("?access%5Ftoken=x&c=3", "/ws?c=3", id="an encoded name"),
        pytest.param("?a=access_token&b=access_token%3D1", "/ws?a=access_token&b=access_token%3D1", id="as a value"),
    ],
)
async def test_access_token_query_parameters_are_removed(
    gateway: GatewayClient, ws_upstream: TestServer, query: str, forwarded: str
) -> None:
    async with gateway.ws_connect("/api/ws/ws" + query):
        pass
    assert seen(ws_upstream).requests[-1][0] == forwarded


async def test_socket_is_closed_with_1008_when_the_token_expires(
    make_gateway: MakeGateway, ws_upstream: TestServer
) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), auth="required"))
    started = time.monotonic()
    async with gateway.ws_connect(f"/api/ws/ws?access_token={token(ttl=2)}") as ws:
        await ws.send_str("still valid")
        assert (await receive(ws)).data == "still valid"
        message = await receive(ws, within=4)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1008, "token expired")
    assert 0.9 < time.monotonic() - started < 3.5
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).closes == [(1008, "token expired")]


# -- limits ------------------------------------------------------------------------------------


async def test_message_over_max_message_closes_with_1009(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{max_message: 64KiB}"))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        await ws.send_bytes(b"x" * (64 * 1024))  # at the limit: fine
        assert len((await receive(ws)).data) == 64 * 1024
        await ws.send_bytes(b"x" * (64 * 1024 + 1))
        message = await receive(ws)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).closes == [(1009, "message too big")]
    async with gateway.ws_connect("/api/ws/ws") as ws:  # and the other way
        await ws.send_str(f"big {64 * 1024 + 1}")
        message = await receive(ws)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1009, "message too big")


async def test_messages_over_the_rate_close_with_1008(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{messages_per_second: 5}"))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        for i in range(12):
            await ws.send_str(f"m{i}")
        echoed = []
        while (message := await receive(ws)).type is WSMsgType.TEXT:
            echoed.append(message.data)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1008, "message rate exceeded")
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).texts == [f"m{i}" for i in range(5)]  # a burst of one second's worth, then the close
    assert echoed == [f"m{i}" for i in range(len(echoed))]  # echoes still in flight are dropped by the close
    assert seen(ws_upstream).closes == [(1008, "message rate exceeded")]


async def test_idle_socket_is_closed_with_1001(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{idle_timeout: 300ms}"))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        for _ in range(3):  # activity keeps it open past the timeout
            await asyncio.sleep(0.15)
            await ws.send_str("busy")
            await receive(ws)
        started = time.monotonic()
        message = await receive(ws)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
    assert 0.2 < time.monotonic() - started < 1.0
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).closes == [(1001, "idle timeout")]


async def test_silent_client_is_pinged_and_dropped_when_it_does_not_answer(
    make_gateway: MakeGateway, ws_upstream: TestServer
) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{ping_interval: 200ms}"))
    async with gateway.ws_connect("/api/ws/ws", autoping=False) as ws:
        message = await receive(ws, within=1)
        assert message.type is WSMsgType.PING  # from the gateway, not answered
        await eventually(lambda: bool(seen(ws_upstream).closes), within=2)
    assert seen(ws_upstream).closes == [(1001, "client went away")]


async def test_an_upstream_that_answers_no_ping_is_dropped_and_the_client_told(
    make_gateway: MakeGateway, ws_upstream: TestServer
) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{ping_interval: 200ms}"))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        await ws.send_str("deaf")
        started = time.monotonic()
        message = await receive(ws, within=2)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1014, "upstream connection lost")
    assert time.monotonic() - started < 1.0  # pinged after 200-300 ms of silence, gone 100 ms later


async def test_silent_peers_that_answer_pings_are_kept(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{ping_interval: 200ms}"))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        echo = asyncio.create_task(receive(ws))  # a pending receive answers the gateway's pings (autoping)
        await asyncio.sleep(0.8)
        await ws.send_str("still here")
        assert (await echo).data == "still here"
    assert b"" in seen(ws_upstream).pings  # the gateway pinged the silent upstream too


async def test_peers_that_talk_are_not_pinged(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{ping_interval: 200ms}"))
    async with gateway.ws_connect("/api/ws/ws", autoping=False) as ws:
        for n in range(15):  # 0.6 s of traffic both ways, every 40 ms
            await ws.send_str(f"m{n}")
            message = await receive(ws)
            assert (message.type, message.data) == (WSMsgType.TEXT, f"m{n}")  # never a PING in between
            await asyncio.sleep(0.04)
    assert seen(ws_upstream).pings == []


async def test_shutdown_closes_every_socket_with_1001(gateway: GatewayClient, ws_upstream: TestServer) -> None:
    sockets = [await gateway.ws_connect("/api/ws/ws") for _ in range(3)]
    async with connect(ws_url(gateway, "/api/ws/ws")) as other:
        await other.send("ready")
        await other.recv()
        assert len(gateway.app[OPEN_RELAYS]) == 4
        await gateway.server.close()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await other.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "gateway shutting down")
    for ws in sockets:
        message = await receive(ws)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "gateway shutting down")
        await ws.close()
    assert sorted(seen(ws_upstream).closes) == [(1001, "gateway shutting down")] * 4


async def test_upgrades_after_shutdown_began_are_503(gateway: GatewayClient, ws_upstream: TestServer) -> None:
    await gateway.app[OPEN_RELAYS].close_all()
    with pytest.raises(WSServerHandshakeError) as refused:
        await gateway.ws_connect("/api/ws/ws")
    assert refused.value.status == 503
    assert seen(ws_upstream).requests == []


# -- either side vanishing -------------------------------------------------------------------


async def test_upstream_vanishing_closes_the_client_with_1014(gateway: GatewayClient) -> None:
    async with gateway.ws_connect("/api/ws/ws") as ws:
        await ws.send_str("abort")
        message = await receive(ws)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1014, "upstream connection lost")


async def _raw_upgrade(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, not a FIN: the rudest way a client can go."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_client_vanishing_closes_the_upstream_with_1001(gateway: GatewayClient, ws_upstream: TestServer) -> None:
    _, writer = await _raw_upgrade(gateway.port, "/api/ws/ws")  # type: ignore[arg-type]
    await eventually(lambda: len(gateway.app[OPEN_RELAYS]) == 1)
    _reset(writer)
    await eventually(lambda: bool(seen(ws_upstream).closes))
    assert seen(ws_upstream).closes == [(1001, "client went away")]
    await eventually(lambda: len(gateway.app[OPEN_RELAYS]) == 0)


# -- nothing left behind -------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_churn_leaves_no_tasks_or_file_descriptors(gateway: GatewayClient) -> None:
    """1,000 connect/disconnect cycles, a quarter of each kind: clean client close, upstream close,
    client TCP reset, upstream TCP reset; then every task and descriptor is gone again."""
    port = gateway.port
    assert port is not None

    async def clean() -> None:
        async with gateway.ws_connect("/api/ws/ws") as ws:
            await ws.send_str("x")
            await receive(ws)

    async def upstream_closes() -> None:
        async with gateway.ws_connect("/api/ws/ws") as ws:
            await ws.send_str("close 4000 bye")
            assert (await receive(ws)).data == 4000

    async def client_resets() -> None:
        _, writer = await _raw_upgrade(port, "/api/ws/ws")
        _reset(writer)

    async def upstream_resets() -> None:
        async with gateway.ws_connect("/api/ws/ws") as ws:
            await ws.send_str("abort")
            assert (await receive(ws)).data == 1014

    kinds: list[Callable[[], Awaitable[None]]] = [clean, upstream_closes, client_resets, upstream_resets]
    await asyncio.gather(*(kind() for kind in kinds))  # warm up: pools, lazy imports
    await eventually(lambda: len(gateway.app[OPEN_RELAYS]) == 0)
    await asyncio.sleep(0.05)
    tasks, fds = len(asyncio.all_tasks()), _open_fds()
    started = time.monotonic()
    for batch in range(20):
        await asyncio.gather(*(kinds[i % 4]() for i in range(batch * 50, (batch + 1) * 50)))
    elapsed = time.monotonic() - started
    await eventually(lambda: len(gateway.app[OPEN_RELAYS]) == 0)
    await eventually(lambda: (len(asyncio.all_tasks()), _open_fds()) == (tasks, fds))
    print(f"churn: 1000 cycles in {elapsed:.2f}s; tasks {tasks}, fds {fds} before and after")


async def test_access_log_line_of_a_relayed_socket(gateway: GatewayClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with gateway.ws_connect("/api/ws/ws") as ws:
            await ws.send_str("x")
            await receive(ws)
        await eventually(lambda: any("gateway.access" == r.name for r in caplog.records))
    line = json.loads(next(r.getMessage() for r in caplog.records if r.name == "gateway.access"))
    assert (line["status"], line["service"]) == (101, "ws")
    assert line["upstream"].startswith("http://127.0.0.1:")


async def test_closed_upstream_sockets_are_not_held_after_their_relay_ends(gateway: GatewayClient) -> None:
    """No timer or task keeps a relay's upstream socket once the relay has ended (aiohttp 3.14's
    heartbeat, which the relay no longer uses, held each one for ping_interval: 30 s)."""
    for _ in range(10):
        async with gateway.ws_connect("/api/ws/ws") as ws:
            await ws.send_str("x")
            await receive(ws)
    relays = gateway.server.app[OPEN_RELAYS]
    await eventually(lambda: not relays)
    await asyncio.sleep(0.1)
    gc.collect()
    # the gateway's upstream sockets are the ones with autoping off (the test's own clients answer pings)
    held = [o for o in gc.get_objects() if isinstance(o, aiohttp.ClientWebSocketResponse) and not o._autoping]
    assert held == []


async def test_a_client_leaving_during_the_upgrade_is_a_499_without_a_traceback(
    gateway: GatewayClient, ws_upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = gateway.make_url("/")
    with caplog.at_level(logging.INFO):
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            b"GET /api/ws/slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the gateway is now waiting for the upstream's handshake
        writer.close()
        await eventually(
            lambda: any('"status":499' in r.getMessage() for r in caplog.records if r.name == "gateway.access")
        )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
