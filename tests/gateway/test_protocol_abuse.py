"""Protocol abuse over raw sockets: every malformed shape gets a clear refusal and never reaches
the upstream; the gateway keeps serving (DESIGN §4, §5; SECURITY.md)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestServer

from gateway.server import OneLineParseErrors
from tests.backends import BACKEND_STATE
from tests.conftest import GatewayClient, MakeGateway, upstream

YAML = """
defaults: {{auth: none}}
limits: {{max_body: 1KiB}}
services:
  svc: {{upstreams: ["{upstream}"]}}
"""
HOST = b"Host: gw\r\n"


@pytest.fixture
async def gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=upstream(backend))


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
    "request line too long": b"GET /api/svc/echo/" + b"a" * 20000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    "header too large": b"GET /api/svc/echo HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n",
    "too many headers": b"GET /api/svc/echo HTTP/1.1\r\n" + HOST
    + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n",
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
    assert answer.startswith(b"HTTP/1.1 404")
    assert b"application/problem+json" in answer
    assert backend.app[BACKEND_STATE].requests == []


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
