"""Protocol abuse over raw sockets: every malformed shape gets a clear refusal and never reaches
the upstream; slow clients are cut without holding anyone back; the gateway keeps serving
(DESIGN §4, §5; SECURITY.md).

The gateway here runs on :class:`gateway.server.GatewayRunner`, the runner ``gateway run``
uses, so the connection handling (timeouts, 414/431) is the production one.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestServer

from gateway.access_log import LineBatcher
from gateway.app import create_app
from gateway.config import load_text
from gateway.server import BODY_MIN_RATE, OneLineParseErrors
from tests.backends import BACKEND_STATE
from tests.conftest import GatewayClient, GatewayTestServer, upstream
from tests.rawhttp import parse_response, read_response, read_until_closed

HEADER_TIMEOUT = 1.0  # short, so a trickling client is cut quickly; every wait below is far longer
BODY_TIMEOUT = 1.0
YAML = """
defaults: {{auth: none}}
limits: {{max_body: 1KiB, header_timeout: 1s, body_timeout: 1s}}
services:
  svc: {{upstreams: ["{upstream}"]}}
"""
HOST = b"Host: gw\r\n"
BODY_TIMED_OUT = (
    f"the request body stalled or came too slowly (more than {BODY_TIMEOUT:g}s without data, "
    f"or under {BODY_MIN_RATE} bytes/s)"
)


@pytest.fixture
async def gateway(aiohttp_client, backend: TestServer) -> GatewayClient:  # type: ignore[no-untyped-def]
    config = load_text(YAML.format(upstream=upstream(backend)))
    client: GatewayClient = await aiohttp_client(GatewayTestServer(create_app(config)))
    return client


async def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes; return everything the gateway answers before closing (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()


SMUGGLING = {
    "content-length with transfer-encoding": b"POST /api/svc/echo HTTP/1.1\r\n" + HOST
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/svc/echo/smuggled HTTP/1.1\r\n"
    + HOST + b"\r\n",
    "conflicting content-length": b"POST /api/svc/echo HTTP/1.1\r\n" + HOST
    + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "malformed chunk size": b"POST /api/svc/echo HTTP/1.1\r\n" + HOST
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "unknown transfer-encoding": b"POST /api/svc/echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: xchunked\r\n\r\n",
    "obs-fold": b"GET /api/svc/echo HTTP/1.1\r\n" + HOST + b"X-A: 1\r\n  folded\r\n\r\n",
    "bare LF": b"GET /api/svc/echo HTTP/1.1\nHost: gw\n\n",
    "raw NUL in the path": b"GET /api/svc/echo/a\x00b HTTP/1.1\r\n" + HOST + b"\r\n",
}  # fmt: skip


@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_malformed_requests_are_400_and_never_reach_the_upstream(
    gateway: GatewayClient, backend: TestServer, data: bytes
) -> None:
    answer = await _exchange(gateway.port, data)
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:80]
    assert backend.app[BACKEND_STATE].requests == []  # not the first request, and no smuggled second one
    assert (await gateway.get("/api/svc/status/200")).status == 200  # and everyone else is still served


@pytest.mark.parametrize(
    ("target", "status"),
    [
        pytest.param("/api/svc/echo/a%00b", 400, id="encoded NUL"),
        pytest.param("/api/svc/echo/a%0d%0aX-Injected:%201", 400, id="encoded CRLF"),
        pytest.param("/api/svc/echo/%zz", 400, id="invalid percent-encoding"),
        pytest.param("http://evil.example/api/svc/echo", 400, id="absolute-form: not an open proxy"),
    ],
)
async def test_path_abuse(gateway: GatewayClient, backend: TestServer, target: str, status: int) -> None:
    answer = await _exchange(gateway.port, f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:80]
    for seen in backend.app[BACKEND_STATE].requests:
        assert "\r" not in seen.raw_path and "\n" not in seen.raw_path
        assert all("injected" not in name.lower() for name, _ in seen.headers)


async def test_connect_is_not_tunnelled(gateway: GatewayClient, backend: TestServer) -> None:
    request = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
    answer = await _exchange(gateway.port, request)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"application/problem+json" in answer
    assert backend.app[BACKEND_STATE].requests == []


async def test_a_connect_target_is_refused_by_the_chain_with_a_problem_and_an_access_line(backend: TestServer) -> None:
    log = io.BytesIO()
    server = GatewayTestServer(
        create_app(load_text(YAML.format(upstream=upstream(backend))), access_log=LineBatcher(log))
    )
    await server.start_server()
    try:
        request = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
        answer = await _exchange(server.port, request)
    finally:
        await server.close()  # flushes the access log
    head, _, raw = answer.partition(b"\r\n\r\n")
    body = json.loads(raw)
    assert (body["status"], body["detail"]) == (400, "the request target must be an absolute path")
    assert f"X-Request-ID: {body['request_id']}".encode() in head
    (line,) = [json.loads(text) for text in log.getvalue().splitlines()]
    assert (line["method"], line["status"], line["request_id"]) == ("CONNECT", 400, body["request_id"])


async def test_body_over_max_body_is_413_and_the_upstream_never_sees_it(
    gateway: GatewayClient, backend: TestServer
) -> None:
    body = b"x" * 5000
    answer = await _exchange(
        gateway.port,
        b"POST /api/svc/upload HTTP/1.1\r\n" + HOST + b"Connection: close\r\nContent-Length: 5000\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert backend.app[BACKEND_STATE].requests == []


def test_a_malformed_request_is_logged_as_one_warning_line() -> None:
    try:
        raise BadHttpMessage("Duplicate Content-Length:\n\n  b'Content-Length: 5'")
    except BadHttpMessage as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                                   (type(exc), exc, exc.__traceback__))  # fmt: skip
    assert OneLineParseErrors().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "refused a malformed request (400): Duplicate Content-Length:"


# -- oversized heads: 414 and 431 ---------------------------------------------------------------

OVERSIZED = {
    "request line too long": (b"GET /api/svc/echo/" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "header field too long": (b"GET /api/svc/echo HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
    "too many headers": (
        b"GET /api/svc/echo HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n",
        431,
    ),
}


@pytest.mark.parametrize(("data", "status"), list(OVERSIZED.values()), ids=list(OVERSIZED))
async def test_oversized_heads_are_414_or_431_problems_and_never_reach_the_upstream(
    gateway: GatewayClient, backend: TestServer, data: bytes, status: int
) -> None:
    response = parse_response(await _exchange(gateway.port, data))
    assert response.status == status
    assert response.header("Content-Type") == "application/problem+json"
    problem = json.loads(response.body)
    assert problem["status"] == status and problem["request_id"] == response.header("X-Request-ID")
    assert backend.app[BACKEND_STATE].requests == []
    assert (await gateway.get("/api/svc/status/200")).status == 200


async def test_a_refused_head_is_logged_as_one_warning_line(
    gateway: GatewayClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway"):
        await _exchange(gateway.port, OVERSIZED["request line too long"][0])
    refused = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.WARNING and refused[0].exc_info is None
    assert refused[0].getMessage() == (
        "refused a malformed request from 127.0.0.1 (414): the request line is longer than 8190 bytes"
    )


# -- slow clients: limits.header_timeout and limits.body_timeout ---------------------------------


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _trickle(writer: asyncio.StreamWriter, pieces: list[bytes], interval: float) -> None:
    for piece in pieces:
        await asyncio.sleep(interval)
        if writer.is_closing():
            return
        writer.write(piece)


async def test_a_client_trickling_its_headers_is_cut_with_408_while_others_are_served(
    gateway: GatewayClient, backend: TestServer
) -> None:
    reader, writer = await _open(gateway.port)
    writer.write(b"GET /api/svc/echo/slowloris HTTP/1.1\r\n")
    # a header line every 0.2 s for up to 20 s: bytes keep coming, the head never completes in time
    trickling = asyncio.create_task(_trickle(writer, [b"X-Slow-%d: 1\r\n" % i for i in range(100)], 0.2))
    try:
        served = [(await gateway.get("/api/svc/status/200")).status for _ in range(5)]  # other connections
        answer = await read_until_closed(reader, seconds=15)
    finally:
        trickling.cancel()
        writer.close()
    assert served == [200] * 5
    response = parse_response(answer)
    assert response.status == 408
    assert json.loads(response.body)["detail"] == f"the request headers did not arrive within {HEADER_TIMEOUT:g}s"
    assert not trickling.done() or trickling.cancelled()  # cut long before the trickle ran out
    assert "/echo/slowloris" not in backend.app[BACKEND_STATE].hits


async def test_a_connection_that_never_sends_a_byte_is_closed_quietly(gateway: GatewayClient) -> None:
    reader, writer = await _open(gateway.port)
    try:
        assert await read_until_closed(reader, seconds=15) == b""  # closed, with no response to nothing
    finally:
        writer.close()


async def test_idle_time_between_keep_alive_requests_is_not_header_time(gateway: GatewayClient) -> None:
    reader, writer = await _open(gateway.port)
    try:
        writer.write(b"GET /api/svc/status/200 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(HEADER_TIMEOUT * 2.5)  # idle on a keep-alive connection: the keep-alive timeout's
        writer.write(b"GET /api/svc/status/201 HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        second = parse_response(await read_until_closed(reader, seconds=15))
    finally:
        writer.close()
    assert second.status == 201


async def test_a_head_trickled_behind_a_request_in_flight_closes_after_that_response(
    gateway: GatewayClient,
) -> None:
    reader, writer = await _open(gateway.port)
    try:
        writer.write(b"GET /api/svc/slow/3 HTTP/1.1\r\n" + HOST + b"\r\nGET /api/svc/echo HTTP/1.1\r\n")
        await asyncio.sleep(0.2)
        writer.write(b"X-Slow: 1\r\n")  # the pipelined head keeps trickling past the header timeout
        answer = await read_until_closed(reader, seconds=15)
    finally:
        writer.close()
    assert answer.count(b"HTTP/1.1 ") == 1  # the slow response whole, and no 408 written into it
    response = parse_response(answer)
    assert response.status == 200 and response.body == b"slept 3.0\n"


async def test_a_stalled_body_is_cut_with_408_and_never_reaches_the_upstream(
    gateway: GatewayClient, backend: TestServer
) -> None:
    reader, writer = await _open(gateway.port)
    try:
        writer.write(b"POST /api/svc/upload HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        answer = await read_until_closed(reader, seconds=15)
    finally:
        writer.close()
    response = parse_response(answer)
    assert response.status == 408
    assert json.loads(response.body)["detail"] == BODY_TIMED_OUT
    assert backend.app[BACKEND_STATE].requests == []  # a small body is read whole before the upstream is called
    assert (await gateway.get("/api/svc/status/200")).status == 200


class Uploads:
    """What an upstream made of the bodies it was sent: ``complete: N bytes`` or ``broken: Error``."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.ended = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except BaseException as exc:  # a read error, or cancelled when the gateway hung up
            self.outcomes.append(f"broken: {type(exc).__name__}")
            raise
        finally:
            self.ended.set()
        self.outcomes.append(f"complete: {len(body)} bytes")
        return web.Response(text="ok")


async def test_a_stalled_streamed_body_is_cut_and_the_upstream_never_gets_it_whole(
    aiohttp_client,
    aiohttp_server,  # type: ignore[no-untyped-def]
) -> None:
    uploads = Uploads()
    uploads_app = web.Application()
    uploads_app.router.add_post("/upload", uploads.handle)
    config = load_text(YAML.format(upstream=upstream(await aiohttp_server(uploads_app))))
    gateway: GatewayClient = await aiohttp_client(GatewayTestServer(create_app(config)))
    reader, writer = await _open(gateway.port)
    try:
        writer.write(b"POST /api/svc/upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        answer = await read_until_closed(reader, seconds=15)
    finally:
        writer.close()
    assert parse_response(answer).status == 408
    await asyncio.wait_for(uploads.ended.wait(), timeout=10)
    assert uploads.outcomes[0].startswith("broken:")


async def test_a_body_trickled_a_byte_at_a_time_is_cut_though_it_never_stalls(
    gateway: GatewayClient, backend: TestServer
) -> None:
    reader, writer = await _open(gateway.port)
    trickling = asyncio.create_task(_trickle(writer, [b"x"] * 100, 0.2))  # 5 bytes/s, never 1 s apart
    try:
        writer.write(b"POST /api/svc/upload HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n")
        answer = await read_until_closed(reader, seconds=15)
    finally:
        trickling.cancel()
        writer.close()
    response = parse_response(answer)
    assert response.status == 408
    assert json.loads(response.body)["detail"] == BODY_TIMED_OUT
    assert backend.app[BACKEND_STATE].requests == []


async def test_a_body_that_keeps_coming_is_not_cut(aiohttp_client, backend: TestServer) -> None:  # type: ignore[no-untyped-def]
    text = YAML.format(upstream=upstream(backend)).replace("max_body: 1KiB", "max_body: 1MiB")
    text = text.replace("body_timeout: 1s", "body_timeout: 3s")
    gateway: GatewayClient = await aiohttp_client(GatewayTestServer(create_app(load_text(text))))
    reader, writer = await _open(gateway.port)
    try:
        writer.write(b"POST /api/svc/upload HTTP/1.1\r\n" + HOST + b"Connection: close\r\nContent-Length: 8000\r\n\r\n")
        # 4 s in all, more than the 3 s body timeout, at 2000 bytes/s: never a long pause, never under 500 bytes/s
        await _trickle(writer, [b"x" * 500] * 16, 0.25)
        response = parse_response(await read_until_closed(reader, seconds=15))
    finally:
        writer.close()
    assert response.status == 200
    assert json.loads(response.body)["length"] == 8000
