"""The WebSocket benchmark's own load client and echo backend (bench/ws_wire.py, ws_echo.py,
ws_client.py rtt) speak RFC 6455 as aiohttp does: each is tried against aiohttp's other side."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ws_client import rtt
from ws_echo import Echo
from ws_wire import BINARY, CLOSE, TEXT, Frame, accept_key, frame, split_frames


def test_accept_key_is_the_rfc_6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_frames_split_back_into_what_was_built_masked_or_not(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    buffer = bytearray(frame(TEXT, payload, masked=True) + frame(BINARY, payload, masked=False))
    assert split_frames(buffer) == [Frame(True, TEXT, payload), Frame(True, BINARY, payload)]
    assert buffer == bytearray()


def test_a_partial_frame_stays_in_the_buffer() -> None:
    whole = frame(TEXT, b"hello", masked=True)
    buffer = bytearray(frame(CLOSE, b"\x03\xe8", masked=False) + whole[:-1])
    assert split_frames(buffer) == [Frame(True, CLOSE, b"\x03\xe8")]
    assert bytes(buffer) == whole[:-1]
    buffer += whole[-1:]
    assert split_frames(buffer) == [Frame(True, TEXT, b"hello")]


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_echo_answers_aiohttps_client_text_binary_ping_and_close(echo_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{echo_port}/ready") as response:
            assert (response.status, await response.read()) == (200, b"ok")
        async with session.ws_connect(f"http://127.0.0.1:{echo_port}/ws", autoping=False) as ws:
            await ws.send_str("héllo" * 100)
            assert (await ws.receive()).data == "héllo" * 100
            await ws.send_bytes(b"\x00\xff" * 40_000)
            assert (await ws.receive()).data == b"\x00\xff" * 40_000
            await ws.ping(b"p")
            pong = await ws.receive()
            assert (pong.type, pong.data) == (WSMsgType.PONG, b"p")
            await ws.close(code=4001)
            assert ws.close_code == 4001


async def test_rtt_client_round_trips_through_an_aiohttp_echo() -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    async with TestServer(app, host="127.0.0.1") as server:
        result = await rtt(str(server.make_url("/ws")).replace("http", "ws", 1), 4, 64, 0.05, 0.2)
    assert result["round_trips"] > 10
    assert 0 < result["p50_ms"] <= result["p99_ms"]
