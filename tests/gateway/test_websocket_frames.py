"""The frame-level WebSocket relay (gateway/ws_relay.py) through a real gateway, byte by byte:
a raw client writes the frames aiohttp's client will not (fragments, reserved bits, unmasked
frames, oversized controls, bad closes), and raw upstreams answer the handshake in ways a real
server would not."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from gateway.websocket import OPEN_RELAYS
from tests.conftest import GatewayClient, MakeGateway, upstream
from tests.gateway.test_websocket import eventually, receive, routes, seen
from tests.gateway.test_websocket import ws_upstream as ws_upstream  # a fixture: the echoing upstream
from tests.rawserver import Handler, Peer, RawServer

CONTINUATION, TEXT, CLOSE, PING, PONG = 0x0, 0x1, 0x8, 0x9, 0xA
RSV1 = 0x40
WITHIN = 5.0  # seconds a read on the client's side may take

# -- frames by hand ------------------------------------------------------------------------------


def _xor(key: bytes, payload: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()


def build(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One frame, masked with a random key (as a client's must be) unless told otherwise."""
    size = len(payload)
    bit = 0x80 if masked else 0
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(key, payload)


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    masked: bool  # the mask bit as it came
    payload: bytes  # unmasked

    @property
    def close(self) -> tuple[int, str]:
        assert self.opcode == CLOSE and len(self.payload) >= 2, self
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:].decode()


async def read_frame(reader: asyncio.StreamReader, within: float | None = WITHIN) -> Frame:
    async with asyncio.timeout(within):
        b0, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        key = await reader.readexactly(4) if b1 & 0x80 else None
        payload = await reader.readexactly(length)
    assert not b0 & 0x70, "a reserved bit set"
    return Frame(bool(b0 & 0x80), b0 & 0x0F, key is not None, _xor(key, payload) if key else payload)


# -- a raw client --------------------------------------------------------------------------------


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    async def closed_with(self, *, answer: bool = True) -> tuple[int, str]:
        """The code and reason of the gateway's close frame (no other frame may come first),
        answered with its echo unless the client already sent its close; then the connection must end."""
        frame = await read_frame(self.reader)
        assert (frame.opcode, frame.masked) == (CLOSE, False), frame
        if answer:
            await self.send(build(CLOSE, frame.payload))
        async with asyncio.timeout(WITHIN):
            assert await self.reader.read() == b"", "bytes after the close frame"
        return frame.close


@contextlib.asynccontextmanager
async def raw_client(gateway: GatewayClient, path: str = "/api/ws/ws") -> AsyncIterator[RawClient]:
    """A client upgraded by hand, with a random Sec-WebSocket-Key (its Accept checked)."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n".encode()
        )
        async with asyncio.timeout(WITHIN):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        fields = {name.lower(): value for name, _, value in (line.partition(b": ") for line in head.split(b"\r\n"))}
        assert fields[b"sec-websocket-accept"] == _accept(key).encode(), head
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def client(make_gateway: MakeGateway, ws_upstream: TestServer) -> AsyncIterator[RawClient]:
    """A raw client of a gateway to the echoing upstream (test_websocket.py's), max_message 1 KiB."""
    gateway = await make_gateway(routes(upstream(ws_upstream), "{max_message: 1KiB}"))
    async with raw_client(gateway) as raw:
        yield raw


async def upstream_closed_with(server: TestServer) -> list[tuple[int | None, str]]:
    await eventually(lambda: bool(seen(server).closes))
    return seen(server).closes


# -- raw upstreams ------------------------------------------------------------------------------

StartRaw = Callable[[Handler], Awaitable[RawServer]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRaw]:
    """``await raw_upstream(handler)``: a started RawServer, closed after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        servers.append(await RawServer(handler).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.close()


def switching(accept: str, *fields: str) -> bytes:
    extra = "".join(f"{line}\r\n" for line in fields)
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    ).encode()


async def _key(peer: Peer) -> str:
    request = await peer.read_request()
    assert request is not None
    key = request.header("Sec-WebSocket-Key")
    assert key is not None
    return key


@dataclass
class Received:
    frames: list[Frame] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def websocket_upstream(received: Received, after_head: bytes = b"") -> Handler:
    """The handshake done by hand (``after_head`` in the same write as the 101), then it sends
    nothing of its own: records every frame, answers a ping with a pong and a close with its echo."""

    async def handle(peer: Peer) -> None:
        peer.send(switching(_accept(await _key(peer))) + after_head)
        await peer.drain()
        while True:
            frame = await read_frame(peer.reader, within=None)
            received.frames.append(frame)
            received.arrived.set()
            if frame.opcode == PING:
                peer.send(build(PONG, frame.payload, masked=False))
            elif frame.opcode == CLOSE:
                peer.send(build(CLOSE, frame.payload, masked=False))
                await peer.drain()
                return

    return handle


# -- messages and control frames relayed ---------------------------------------------------------


async def test_fragmented_text_reaches_the_upstream_as_one_message_and_a_ping_between_is_relayed(
    client: RawClient, ws_upstream: TestServer
) -> None:
    await client.send(build(TEXT, b"hello ", fin=False), build(PING, b"between"))
    pong = await read_frame(client.reader)  # the upstream's answer, mid-message
    assert (pong.opcode, pong.masked, pong.payload) == (PONG, False, b"between")
    await client.send(build(CONTINUATION, "fragmented wörld".encode()))
    echo = await read_frame(client.reader)
    assert (echo.opcode, echo.fin, echo.payload) == (TEXT, True, "hello fragmented wörld".encode())
    assert seen(ws_upstream).texts == ["hello fragmented wörld"]
    assert seen(ws_upstream).pings == [b"between"]


async def test_empty_close_from_the_client_reaches_the_upstream_as_1000_and_is_echoed(
    client: RawClient, ws_upstream: TestServer
) -> None:
    await client.send(build(CLOSE))
    assert await client.closed_with(answer=False) == (1000, "")
    assert await upstream_closed_with(ws_upstream) == [(1000, "")]


# -- limits --------------------------------------------------------------------------------------


async def test_fragments_together_over_max_message_close_with_1009(client: RawClient, ws_upstream: TestServer) -> None:
    await client.send(build(TEXT, b"a" * 600, fin=False))  # each fragment under 1 KiB, not both
    await client.send(build(CONTINUATION, b"b" * 600))
    assert await client.closed_with() == (1009, "message too big")
    assert await upstream_closed_with(ws_upstream) == [(1009, "message too big")]
    assert seen(ws_upstream).texts == []


# -- protocol errors from the client: 1002 to it, 1001 to the upstream ---------------------------


async def test_unmasked_frame_from_the_client_is_a_1002_and_the_upstream_gets_1001(
    client: RawClient, ws_upstream: TestServer
) -> None:
    await client.send(build(TEXT, b"in clear", masked=False))
    assert await client.closed_with() == (1002, "protocol error")
    assert await upstream_closed_with(ws_upstream) == [(1001, "client went away")]
    assert seen(ws_upstream).texts == []


async def test_reserved_bit_set_by_the_client_is_a_1002(client: RawClient, ws_upstream: TestServer) -> None:
    await client.send(build(TEXT, b"compressed?", rsv=RSV1))
    assert await client.closed_with() == (1002, "protocol error")
    assert await upstream_closed_with(ws_upstream) == [(1001, "client went away")]
    assert seen(ws_upstream).texts == []


async def test_continuation_without_a_message_in_progress_is_a_1002(client: RawClient, ws_upstream: TestServer) -> None:
    await client.send(build(CONTINUATION, b"orphan"))
    assert await client.closed_with() == (1002, "protocol error")
    assert seen(ws_upstream).texts == []


async def test_ping_with_over_125_bytes_is_a_1002(client: RawClient, ws_upstream: TestServer) -> None:
    await client.send(build(PING, b"p" * 126))
    assert await client.closed_with() == (1002, "protocol error")
    assert seen(ws_upstream).pings == []


async def test_close_with_a_one_byte_payload_is_a_1002(client: RawClient, ws_upstream: TestServer) -> None:
    await client.send(build(CLOSE, b"\x03"))
    assert await client.closed_with(answer=False) == (1002, "protocol error")
    assert await upstream_closed_with(ws_upstream) == [(1001, "client went away")]


# -- the upstream's handshake --------------------------------------------------------------------

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "chat"}  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        pytest.param(lambda key: switching(_accept(key + "x")), "invalid handshake", id="wrong accept"),
        pytest.param(
            lambda key: switching(_accept(key), "Sec-WebSocket-Extensions: permessage-deflate"),
            "extension",
            id="an extension",
        ),
        pytest.param(
            lambda key: switching(_accept(key), "Sec-WebSocket-Protocol: other"),
            "subprotocol",
            id="a subprotocol not offered",
        ),
        pytest.param(lambda key: b"garbage\r\n\r\n", "status line", id="not HTTP"),
        pytest.param(lambda key: None, "closed before the response head", id="closed before answering"),
    ],
)
async def test_bad_upstream_handshake_is_a_502_problem_and_no_socket(
    make_gateway: MakeGateway, raw_upstream: StartRaw, answer: Callable[[str], bytes | None], detail: str
) -> None:
    done = asyncio.Event()

    async def handle(peer: Peer) -> None:
        reply = answer(await _key(peer))
        if reply is not None:
            peer.send(reply)
            await peer.until_client_closes()  # the gateway must not keep the connection open
        done.set()

    server = await raw_upstream(handle)
    gateway = await make_gateway(routes(str(server.origin)))
    response = await gateway.get("/api/ws/ws", headers=UPGRADE)
    assert (response.status, response.content_type) == (502, "application/problem+json")
    assert "Sec-WebSocket-Accept" not in response.headers
    body = await response.json(content_type=None)
    assert body["status"] == 502 and detail in body["detail"], body
    await asyncio.wait_for(done.wait(), timeout=WITHIN)


async def test_frame_in_the_same_write_as_the_101_reaches_the_client(
    make_gateway: MakeGateway, raw_upstream: StartRaw
) -> None:
    received = Received()
    server = await raw_upstream(websocket_upstream(received, after_head=build(TEXT, b"early", masked=False)))
    gateway = await make_gateway(routes(str(server.origin)))
    async with gateway.ws_connect("/api/ws/ws") as ws:
        message = await receive(ws)
        assert (message.type, message.data) == (WSMsgType.TEXT, "early")
    assert ws.close_code == 1000
    assert received.frames[-1].close == (1000, "")


# -- the gateway's heartbeat ---------------------------------------------------------------------


async def test_heartbeat_pings_to_the_upstream_are_masked(make_gateway: MakeGateway, raw_upstream: StartRaw) -> None:
    received = Received()
    server = await raw_upstream(websocket_upstream(received))
    gateway = await make_gateway(routes(str(server.origin), "{ping_interval: 200ms}"))
    async with raw_client(gateway):  # silent too
        await asyncio.wait_for(received.arrived.wait(), timeout=2)
    ping = received.frames[0]
    assert (ping.opcode, ping.fin, ping.masked, ping.payload) == (PING, True, True, b"")


async def test_heartbeat_pings_to_the_client_are_not_masked(make_gateway: MakeGateway, ws_upstream: TestServer) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{ping_interval: 200ms}"))
    async with raw_client(gateway) as client:
        ping = await read_frame(client.reader, within=2)
    assert (ping.opcode, ping.fin, ping.masked, ping.payload) == (PING, True, False, b"")


# -- flow control ----------------------------------------------------------------------------------


async def test_an_upstream_that_does_not_read_stops_the_gateway_reading_the_client(
    make_gateway: MakeGateway, raw_upstream: StartRaw
) -> None:
    stop = asyncio.Event()

    async def deaf(peer: Peer) -> None:  # accepts, then reads nothing until told to go
        peer.send(switching(_accept(await _key(peer))))
        await peer.drain()
        await stop.wait()
        peer.writer.transport.abort()

    server = await raw_upstream(deaf)
    gateway = await make_gateway(routes(str(server.origin), "{messages_per_second: 100000}"))
    message = build(0x2, b"x" * 65536)
    try:
        async with raw_client(gateway) as client:
            for _ in range(512):  # 32 MiB, more than the kernel's buffers on both sockets hold
                client.writer.write(message)
            await asyncio.sleep(1.0)
            (relay,) = gateway.app[OPEN_RELAYS]._relays
            assert relay.upstream.transport is not None
            assert relay.upstream.transport.get_write_buffer_size() < 1024 * 1024
            assert client.writer.transport.get_write_buffer_size() > 8 * 1024 * 1024  # held back at the client
            stop.set()  # the upstream goes: the relay ends without waiting for its closing handshake
            client.writer.transport.abort()
    finally:
        stop.set()


async def test_a_close_from_a_client_that_does_not_read_ends_the_relay_without_waiting_out_the_timeout(
    make_gateway: MakeGateway, ws_upstream: TestServer
) -> None:
    gateway = await make_gateway(routes(upstream(ws_upstream), "{max_message: 16MiB}"))
    async with raw_client(gateway) as client:
        await client.send(build(TEXT, b"big 8000000"))  # the upstream sends 8 MB the client never reads
        await eventually(lambda: seen(ws_upstream).texts == ["big 8000000"])
        await asyncio.sleep(0.5)  # the gateway stops reading the upstream: the client is backed up
        await client.send(build(CLOSE, struct.pack("!H", 1000)))
        started = asyncio.get_running_loop().time()
        await eventually(lambda: len(gateway.app[OPEN_RELAYS]) == 0, within=4.0)  # CLOSE_TIMEOUT is 5 s
        assert asyncio.get_running_loop().time() - started < 2.0
    assert seen(ws_upstream).closes == [(1000, "")]
