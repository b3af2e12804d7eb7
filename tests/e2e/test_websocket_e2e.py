"""The gateway process (``python -m gateway run``) relaying to the chat process
(``python -m examples.chat``), as deployed: SIGTERM, vanishing clients, a crowded room."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Literal

import aiohttp
import jwt
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.conftest import JWT_TEST_SECRET, free_port, wait_for_port
from tests.e2e.conftest import GatewayProcess, StartGateway

Socket = aiohttp.ClientWebSocketResponse[Literal[True]]


@pytest.fixture
def chat_port() -> Iterator[int]:
    """The chat service in its own process; stopped by its pid."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.chat", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, timeout=15)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()


@pytest.fixture
def gateway(start_gateway: StartGateway, chat_port: int) -> GatewayProcess:
    return start_gateway(
        f"jwt:\n  secret: {JWT_TEST_SECRET}\n  claims_headers: {{sub: X-User-Id}}\n"
        f'services:\n  chat:\n    upstreams: ["http://127.0.0.1:{chat_port}"]\n    websocket: true\n'
    )


def room_url(gateway: GatewayProcess, room: str, sub: str = "alice") -> str:
    now = int(time.time())
    token = jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, JWT_TEST_SECRET, algorithm="HS256")
    return f"ws://127.0.0.1:{gateway.port}/api/chat/rooms/{room}?access_token={token}"


async def stats(chat_port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{chat_port}/stats") as response:
        rooms: dict[str, int] = (await response.json())["rooms"]
        return rooms


async def until_stats(chat_port: int, expected: dict[str, int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (rooms := await stats(chat_port)) != expected:
        assert time.monotonic() < deadline, f"rooms stayed {rooms}, expected {expected}"
        await asyncio.sleep(0.05)


async def test_sigterm_closes_every_relayed_socket_with_1001(gateway: GatewayProcess, chat_port: int) -> None:
    sockets = [await connect(room_url(gateway, "lobby", f"user{i}")) for i in range(3)]
    await until_stats(chat_port, {"lobby": 3})
    code = await asyncio.to_thread(gateway.stop)
    assert code == 0
    for ws in sockets:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()  # notices, then the close
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "gateway shutting down")
    await until_stats(chat_port, {})  # and the chat side saw every socket go


async def test_a_client_that_vanishes_leaves_the_room(gateway: GatewayProcess, chat_port: int) -> None:
    async with connect(room_url(gateway, "lobby", "stays")) as stays:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        path = room_url(gateway, "lobby", "vanishes").split(str(gateway.port), 1)[1]
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await until_stats(chat_port, {"lobby": 2})
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a TCP reset
        events = [json.loads(await stays.recv()) for _ in range(4)]  # welcome, own join, vanishes joins, leaves
        assert [(e["type"], e.get("user"), e.get("members")) for e in events[2:]] == [
            ("join", "vanishes", 2), ("leave", "vanishes", 1),
        ]  # fmt: skip


async def test_500_clients_in_one_room_get_every_broadcast(gateway: GatewayProcess, chat_port: int) -> None:
    clients, lines = 500, 20
    url = room_url(gateway, "crowd", "member")
    received: list[list[int]] = [[] for _ in range(clients)]

    async def read(ws: Socket, ids: list[int]) -> None:
        while len(ids) < lines:
            message = await ws.receive(timeout=30)
            assert message.type is aiohttp.WSMsgType.TEXT, message
            event = json.loads(message.data)
            if event["type"] == "message":
                ids.append(event["id"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        sockets: list[Socket] = []
        readers: list[asyncio.Task[None]] = []
        try:
            for batch in range(clients // 50):
                sockets += await asyncio.gather(*(session.ws_connect(url) for _ in range(50)))
                readers += [
                    asyncio.create_task(read(ws, received[batch * 50 + i])) for i, ws in enumerate(sockets[-50:])
                ]
            reading = asyncio.gather(*readers)
            await until_stats(chat_port, {"crowd": clients}, within=30)
            joined = time.monotonic() - started
            started = time.monotonic()
            for i in range(lines):
                await sockets[i * 7].send_str(f"line {i}")
            await asyncio.wait_for(reading, 30)
            fanned_out = time.monotonic() - started
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await asyncio.gather(*(ws.close() for ws in sockets))
    assert len(received[0]) == lines and all(ids == received[0] for ids in received)  # one order for everyone
    print(f"\n{clients} clients joined in {joined:.2f}s; {lines} lines reached all of them {fanned_out:.2f}s later")
    assert fanned_out < 15
