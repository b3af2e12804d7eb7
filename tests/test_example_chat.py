"""The demo chat service (examples/chat.py), directly and through the gateway (DESIGN §7)."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from examples.chat import CHAT, ChatSettings, create_app
from tests.conftest import JWT_TEST_SECRET, MakeGateway, upstream

Client = TestClient[web.Request, web.Application]
Socket = aiohttp.ClientWebSocketResponse[Literal[True]]


@pytest.fixture
async def chat(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app(ChatSettings(heartbeat=5.0)))


async def join(client: Client, room: str = "lobby", user: str | None = None, *, autoping: bool = True) -> Socket:
    """Join ``room`` as ``user`` and read the welcome and one's own join notice."""
    headers = {"X-User-Id": user} if user else {}
    ws = await client.ws_connect(f"/rooms/{room}", headers=headers, autoping=autoping)
    welcome = await event(ws)
    assert welcome["type"] == "welcome"
    joined = await event(ws)
    assert (joined["type"], joined["user"]) == ("join", welcome["user"])
    return ws


async def event(ws: Socket, within: float = 5.0) -> dict[str, Any]:
    message = await ws.receive(timeout=within)
    assert message.type is WSMsgType.TEXT, message
    parsed: dict[str, Any] = json.loads(message.data)
    return parsed


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- rooms, notices, messages -------------------------------------------------------------


async def test_join_notices_carry_the_member_count(chat: Client) -> None:
    alice = await chat.ws_connect("/rooms/lobby", headers={"X-User-Id": "alice"})
    welcome, joined = await event(alice), await event(alice)
    assert welcome == {"type": "welcome", "room": "lobby", "user": "alice", "members": 1}
    assert {k: joined[k] for k in ("type", "room", "user", "members")} == {
        "type": "join", "room": "lobby", "user": "alice", "members": 1,
    }  # fmt: skip
    assert joined["ts"].endswith("Z") and isinstance(joined["id"], int)
    bob = await join(chat, user="bob")
    seen_by_alice = await event(alice)
    assert (seen_by_alice["type"], seen_by_alice["user"], seen_by_alice["members"]) == ("join", "bob", 2)
    await bob.close()
    left = await event(alice)
    assert (left["type"], left["user"], left["members"]) == ("leave", "bob", 1)
    await alice.close()


async def test_messages_reach_everyone_in_the_room_in_id_order(chat: Client) -> None:
    alice, bob = await join(chat, user="alice"), await join(chat, user="bob")
    elsewhere = await join(chat, "kitchen", user="carol")
    await event(alice)  # bob's join
    await alice.send_str("hello")
    await bob.send_str(json.dumps({"text": "hi alice"}))
    for ws in (alice, bob):
        first, second = await event(ws), await event(ws)
        assert [(e["type"], e["user"], e["text"]) for e in (first, second)] == [
            ("message", "alice", "hello"), ("message", "bob", "hi alice"),
        ]  # fmt: skip
        assert second["id"] == first["id"] + 1 and first["room"] == "lobby"
    await elsewhere.send_str("anyone?")
    assert (await event(elsewhere))["text"] == "anyone?"  # carol saw nothing from the lobby first
    for ws in (alice, bob, elsewhere):
        await ws.close()


async def test_identity_is_x_user_id_or_anonymous(chat: Client) -> None:
    sockets = [await chat.ws_connect("/rooms/r", headers=h) for h in ({}, {"X-User-Id": "dave"}, {})]
    users = [(await event(ws))["user"] for ws in sockets]
    assert users == ["anonymous-1", "dave", "anonymous-2"]
    for ws in sockets:
        await ws.close()


async def test_stats_count_members_per_room(chat: Client) -> None:
    sockets = [await join(chat, room) for room in ("a", "a", "b")]
    assert await (await chat.get("/stats")).json() == {
        "rooms": {"a": 2, "b": 1}, "connections": 3, "events_sent": 4,  # join notices: 1 + 2 in a, 1 in b
    }  # fmt: skip
    for ws in sockets:
        await ws.close()
    await eventually(lambda: not chat.app[CHAT].rooms)
    assert (await (await chat.get("/stats")).json())["rooms"] == {}


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        pytest.param("   ", "send a chat line", id="empty"),
        pytest.param("x" * 4097, "at most 4096 characters", id="too long"),
        pytest.param('{"text": ""}', "send a chat line", id="empty JSON text"),
    ],
)
async def test_refused_messages_get_an_error_event(chat: Client, text: str, detail: str) -> None:
    ws = await join(chat)
    await ws.send_str(text)
    error = await event(ws)
    assert error["type"] == "error" and detail in error["detail"]
    await ws.close()


async def test_binary_is_refused_with_1003(chat: Client) -> None:
    ws = await join(chat)
    await ws.send_bytes(b"\x00")
    message = await ws.receive(timeout=5)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1003)


async def test_bad_room_names_and_plain_gets(chat: Client) -> None:
    assert (await chat.get("/rooms/no%20spaces")).status == 404
    assert (await chat.get("/rooms/lobby")).status == 400


async def test_page_connects_through_the_gateway_with_a_token(chat: Client) -> None:
    response = await chat.get("/")
    assert response.content_type == "text/html"
    page = await response.text()
    assert "/api/chat/rooms/" in page and "access_token" in page


# -- heartbeat, idleness, shutdown ----------------------------------------------------------


async def test_silent_clients_are_pinged_and_idle_ones_closed(aiohttp_client: AiohttpClient) -> None:
    chat = await aiohttp_client(create_app(ChatSettings(heartbeat=0.2, idle_timeout=0.6)))
    ws = await join(chat, autoping=False)
    started = time.monotonic()
    message = await ws.receive(timeout=2)
    assert message.type is WSMsgType.PING
    await ws.pong(message.data)
    while (message := await ws.receive(timeout=2)).type is WSMsgType.PING:
        await ws.pong(message.data)  # answered pings keep it alive, but do not count as activity
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
    assert 0.5 < time.monotonic() - started < 1.5


async def test_shutdown_closes_clients_with_1001(chat: Client) -> None:
    sockets = [await join(chat) for _ in range(3)]
    await chat.server.close()
    for ws in sockets:
        while (message := await ws.receive(timeout=5)).type is WSMsgType.TEXT:
            pass  # leave notices of the others
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "server shutting down")
        await ws.close()


# -- slow consumers -------------------------------------------------------------------------


async def _slow_client(port: int, path: str) -> socket.socket:
    """A client that completes the handshake, then never reads (a tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode(),
    )
    head = await loop.sock_recv(sock, 1024)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _flood_and_collect(sender: Socket, readers: list[Socket], count: int) -> float:
    """Send ``count`` 4 KiB lines, never more than 8 ahead of the slowest of ``readers`` (the sender
    among them, as a chat client would be); return how long until every reader has them all, in order."""
    line = "x" * 4000
    received: list[list[int]] = [[] for _ in readers]

    async def collect(ws: Socket, ids: list[int]) -> None:
        while len(ids) < count:
            got = await event(ws, within=10)
            if got["type"] == "message":
                ids.append(got["id"])

    started = time.monotonic()
    collecting = asyncio.gather(*(collect(ws, ids) for ws, ids in zip(readers, received, strict=True)))
    try:
        for sent in range(1, count + 1):
            await sender.send_str(line)
            if sent % 8 == 0:
                await eventually(functools.partial(_caught_up, received, sent - 8), within=10)
        await asyncio.wait_for(collecting, 10)
    finally:
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
    for ids in received:
        assert ids == sorted(ids) and len(set(ids)) == count
    return time.monotonic() - started


def _caught_up(received: list[list[int]], count: int) -> bool:
    return min(len(ids) for ids in received) >= count


async def test_a_slow_consumer_is_cut_off_without_stalling_the_room(aiohttp_server: AiohttpServer) -> None:
    server = await aiohttp_server(create_app(ChatSettings(send_queue=64)))
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/rooms/busy"
        sender, reader = await session.ws_connect(url), await session.ws_connect(url)
        slow = await _slow_client(server.port, "/rooms/busy")  # type: ignore[arg-type]
        try:
            elapsed = await _flood_and_collect(sender, [sender, reader], 1500)
            await eventually(lambda: server.app[CHAT].stats()["connections"] == 2)
        finally:
            slow.close()
            await sender.close()
            await reader.close()
    print(f"1500 x 4 KB lines past a stalled reader: {elapsed:.2f}s")
    assert elapsed < 10


# -- through the gateway ---------------------------------------------------------------------

GATEWAY = """
jwt:
  secret: ${{JWT_SECRET}}
  claims_headers: {{sub: X-User-Id}}
services:
  chat:
    upstreams: ["{chat}"]
    websocket: {{messages_per_second: 100000}}
"""


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, JWT_TEST_SECRET, algorithm="HS256")


@pytest.fixture
async def chat_server(aiohttp_server: AiohttpServer) -> TestServer:
    server: TestServer = await aiohttp_server(create_app(ChatSettings(send_queue=64)))
    return server


async def test_identity_through_the_gateway_is_the_token_subject(
    make_gateway: MakeGateway, chat_server: TestServer
) -> None:
    gateway = await make_gateway(GATEWAY, chat=upstream(chat_server))
    spoofed = {"X-User-Id": "mallory"}
    ws = await gateway.ws_connect(f"/api/chat/rooms/lobby?access_token={token('carol')}", headers=spoofed)
    assert (await event(ws))["user"] == "carol"
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect("/api/chat/rooms/lobby", headers=spoofed)
    assert refused.value.status == 401


async def test_a_slow_consumer_behind_the_gateway_does_not_stall_the_room(
    make_gateway: MakeGateway, chat_server: TestServer
) -> None:
    gateway = await make_gateway(GATEWAY, chat=upstream(chat_server))
    path = f"/api/chat/rooms/busy?access_token={token('reader')}"
    reader = await gateway.ws_connect(path)
    slow = await _slow_client(gateway.port, f"/api/chat/rooms/busy?access_token={token('slow')}")  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        sender = await session.ws_connect(f"http://127.0.0.1:{chat_server.port}/rooms/busy")  # straight to chat
        try:
            elapsed = await _flood_and_collect(sender, [sender, reader], 3000)
            await eventually(lambda: chat_server.app[CHAT].stats()["connections"] == 2)  # the slow one was cut
        finally:
            slow.close()
            await sender.close()
            await reader.close()
    print(f"3000 x 4 KB lines through the gateway past a stalled reader: {elapsed:.2f}s")
    assert elapsed < 20
