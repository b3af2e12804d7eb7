"""The cache with header bytes that are not UTF-8 (obs-text, RFC 9110 §5.5): legal in a field value,
and handed to the gateway as lone surrogates (``surrogateescape``). A cached route must answer such
a request or such a response as the plain proxy does, store it, and find it again; it used to fail
with a 500 (orjson refuses lone surrogates when keying the request or encoding the entry).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.app import create_app
from gateway.config import load_text
from tests.conftest import GatewayTestServer
from tests.rawhttp import read_raw_response
from tests.rawserver import RawServer, answering

DATE = "Sun, 22 Nov 2026 06:00:00 GMT"
ODD_RESPONSE = f"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: {DATE}\r\nX-Odd: caf".encode() + b"\xe9\r\n\r\nok"


class Gateway:
    def __init__(self, server: GatewayTestServer, upstream: RawServer) -> None:
        self.server = server
        self.upstream = upstream

    async def ask(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(request)
            return await read_raw_response(reader, 5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @property
    def upstream_requests(self) -> int:
        return sum(len(peer.requests) for peer in self.upstream.peers)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    upstream = await RawServer(answering(lambda request: ODD_RESPONSE)).start()
    yaml = f"""
defaults: {{auth: none}}
services:
  cached: {{upstreams: ["{upstream.origin}"], cache: {{ttl: 30s}}}}
"""
    server = GatewayTestServer(create_app(load_text(yaml)))
    await server.start_server()
    yield Gateway(server, upstream)
    await server.close()
    await upstream.close()


@pytest.mark.parametrize("field", [b"Host: gw\xff", b"Host: gw\r\nX-Forwarded-Host: caf\xe9"])
async def test_a_keyed_request_field_that_is_not_utf8_is_cached_under_its_own_key(
    gateway: Gateway, field: bytes
) -> None:
    request = b"GET /api/cached/a HTTP/1.1\r\n" + field + b"\r\n\r\n"
    miss = await gateway.ask(request)
    hit = await gateway.ask(request)
    other = await gateway.ask(b"GET /api/cached/a HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert miss.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Cache: MISS" in miss
    assert b"X-Cache: HIT" in hit
    assert b"X-Cache: MISS" in other  # the plain Host is another key
    assert gateway.upstream_requests == 2


async def test_a_response_field_that_is_not_utf8_is_stored_and_replayed_as_on_its_miss(gateway: Gateway) -> None:
    request = b"GET /api/cached/b HTTP/1.1\r\nHost: gw\r\n\r\n"
    miss = await gateway.ask(request)
    hit = await gateway.ask(request)
    assert miss.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Cache: MISS" in miss
    assert hit.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Cache: HIT" in hit
    assert [line for line in hit.split(b"\r\n") if line.startswith(b"X-Odd")] == [
        line for line in miss.split(b"\r\n") if line.startswith(b"X-Odd")
    ]
    assert gateway.upstream_requests == 1
