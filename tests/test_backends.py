"""The echo backend (tests/backends.py) does what the proxy tests rely on; read as its documentation."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from .backends import BACKEND_STATE, GZIP_BODY, GZIP_TEXT, BackendState, echo_app, pattern_sha256

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(echo_app())


def state_of(client: Client) -> BackendState:
    return client.app[BACKEND_STATE]


async def test_echo_describes_the_request_line(client: Client) -> None:
    body = await (await client.post("/echo/a%2Fb?x=1&x=2")).json()
    assert body["method"] == "POST"
    assert body["path"] == "/echo/a/b"
    assert body["raw_path"] == "/echo/a%2Fb?x=1&x=2"
    assert body["query_string"] == "x=1&x=2"


async def test_echo_keeps_duplicate_headers_in_order(client: Client) -> None:
    headers = CIMultiDict([("X-Dup", "1"), ("X-Other", "o"), ("X-Dup", "2")])
    body = await (await client.get("/echo", headers=headers)).json()
    sent = [pair for pair in body["headers"] if pair[0] in ("X-Dup", "X-Other")]
    assert sent == [["X-Dup", "1"], ["X-Other", "o"], ["X-Dup", "2"]]


async def test_echo_hashes_the_body(client: Client) -> None:
    payload = b"x" * 200_000
    body = await (await client.put("/echo/upload", data=payload)).json()
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_every_request_is_recorded(client: Client) -> None:
    await client.get("/echo/one?q=1", headers={"X-Test": "yes"})
    await client.get("/nowhere")
    state = state_of(client)
    assert state.hits == {"/echo/one": 1, "/nowhere": 1}
    method, raw_path, headers = state.requests[0]
    assert (method, raw_path) == ("GET", "/echo/one?q=1")
    assert ("X-Test", "yes") in headers
    assert state.last_request is not None and state.last_request["path"] == "/nowhere"


@pytest.mark.parametrize(
    ("code", "body"), [(200, b"status 200\n"), (418, b"status 418\n"), (503, b"status 503\n"), (204, b"")]
)
async def test_status_answers_that_status(client: Client, code: int, body: bytes) -> None:
    response = await client.get(f"/status/{code}")
    assert (response.status, await response.read()) == (code, body)


async def test_slow_answers_after_sleeping(client: Client) -> None:
    started = time.monotonic()
    response = await client.get("/slow/0.1")
    assert response.status == 200
    assert time.monotonic() - started >= 0.09  # the loop may wake within its clock resolution


@pytest.mark.parametrize("path", ["/slow/-1", "/slow/nan", "/status/abc", "/status/99"])
async def test_bad_numbers_are_400(client: Client, path: str) -> None:
    assert (await client.get(path)).status == 400


async def test_stream_is_chunked_without_length(client: Client) -> None:
    response = await client.get("/stream/3", params={"delay": "0"})
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.headers
    assert await response.read() == b"chunk-0\nchunk-1\nchunk-2\n"


async def test_stream_hold_sends_the_first_chunk_before_release(client: Client) -> None:
    response = await client.get("/stream-hold")
    assert await response.content.readline() == b"chunk-0\n"
    release = state_of(client).release
    assert not release.is_set()
    release.set()
    assert await response.content.read() == b"chunk-1\n"


async def test_cookies_are_two_set_cookie_headers(client: Client) -> None:
    response = await client.get("/cookies")
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


async def test_gzip_is_sent_compressed_as_is(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(echo_app(), auto_decompress=False)
    response = await client.get("/gzip")
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == GZIP_BODY


async def test_gzip_decodes_to_the_known_text(client: Client) -> None:
    assert await (await client.get("/gzip")).read() == GZIP_TEXT


async def test_download_has_length_and_pattern(client: Client) -> None:
    size = 200_001
    response = await client.get(f"/download/{size}")
    assert response.headers["Content-Length"] == str(size)
    assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(size)


async def test_download_chunked_has_no_length(client: Client) -> None:
    response = await client.get("/download/100000", params={"chunked": "1"})
    assert "Content-Length" not in response.headers
    assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(100_000)


async def test_upload_answers_length_and_sha(client: Client) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 100_000

    answer = await (await client.post("/upload", data=body())).json()
    assert answer == {"length": 1_000_000, "sha256": hashlib.sha256(b"y" * 1_000_000).hexdigest()}


async def test_redirect_is_a_302_to_echo_target(client: Client) -> None:
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/echo/target"


async def test_hop_sends_hop_by_hop_headers(client: Client) -> None:
    response = await client.get("/hop")
    headers = response.headers
    assert headers["Connection"] == "close, X-Private-Hop"
    assert (headers["X-Private-Hop"], headers["Keep-Alive"], headers["Upgrade"]) == ("secret", "timeout=5", "h2c")
    assert (headers["Proxy-Authenticate"], headers["Trailer"], headers["X-Kept"]) == ("Basic", "X-T", "yes")
    assert await response.read() == b"hop\n"


async def test_head_only_get_has_a_body(client: Client) -> None:
    response = await client.get("/head-only")
    assert (response.headers["Content-Length"], await response.read()) == ("3", b"abc")


async def test_head_only_head_has_length_but_no_body(client: Client) -> None:
    response = await client.head("/head-only")
    assert (response.headers["Content-Length"], await response.read()) == ("3", b"")


async def test_headers_big_sends_fifty_headers(client: Client) -> None:
    response = await client.get("/headers-big")
    assert len([name for name in response.headers if name.startswith("X-H-")]) == 50


async def test_count_increments(client: Client) -> None:
    counts = [(await (await client.post("/count")).json())["count"] for _ in range(3)]
    assert counts == [1, 2, 3]
    assert state_of(client).hits["/count"] == 3


async def test_ws_echo_echoes_and_closes_with_the_asked_code(client: Client) -> None:
    async with client.ws_connect("/ws-echo", protocols=("echo",)) as ws:
        assert ws.protocol == "echo"
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes() == b"\x00\x01"
        await ws.send_str("close 4001 bye now")
        message = await ws.receive()
        assert message.type is WSMsgType.CLOSE
        assert (message.data, message.extra) == (4001, "bye now")
