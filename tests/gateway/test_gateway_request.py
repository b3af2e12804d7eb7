"""The requests the gateway's server makes (``GatewayRequest``): aiohttp's, with a ``get`` that
answers as any mapping's does without raising and catching ``KeyError`` for an absent key; and the
handler the server gives them to (``EveryPath.handler_for``: aiohttp's, without the router's walk)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_text
from gateway.server import GatewayRequest
from middleware.base import CLAIMS, OUTCOME, REQUEST_ID
from tests.conftest import GatewayTestServer, upstream
from tests.rawhttp import read_raw_response

ABSENT = web.RequestKey("absent", str)


async def test_get_answers_as_a_mapping_does_for_present_and_absent_keys(  # type: ignore[no-untyped-def]
    aiohttp_client, backend: TestServer
) -> None:
    app = create_app(load_text(f'defaults: {{auth: none}}\nservices: {{svc: {{upstreams: ["{upstream(backend)}"]}}}}'))
    seen: list[tuple[type, list[object], list[object]]] = []

    async def look(request: web.BaseRequest, response: web.StreamResponse) -> None:
        keys = [REQUEST_ID, OUTCOME, CLAIMS, ABSENT]  # set by the chain, set, absent (anonymous), absent
        ours = [request.get(key) for key in keys] + [request.get(ABSENT, "default")]
        mapping = [Mapping.get(request, key) for key in keys] + [Mapping.get(request, ABSENT, "default")]
        seen.append((type(request), ours, mapping))

    app.on_response_prepare.append(look)
    client = await aiohttp_client(GatewayTestServer(app))
    async with client.get("/api/svc/echo/x") as response:
        assert response.status == 200
        request_id = response.headers["X-Request-ID"]
    ((kind, ours, mapping),) = seen
    assert kind is GatewayRequest
    assert ours == mapping
    assert ours[0] == request_id and ours[1] is not None
    assert ours[2:] == [None, None, "default"]


# -- the server's request handler (EveryPath.handler_for: no router walk) ----------------------


async def test_every_request_gets_the_gateway_app_and_an_empty_match(  # type: ignore[no-untyped-def]
    aiohttp_client, backend: TestServer
) -> None:
    app = create_app(load_text(f'defaults: {{auth: none}}\nservices: {{svc: {{upstreams: ["{upstream(backend)}"]}}}}'))
    seen: list[tuple[object, dict[str, str]]] = []

    async def look(request: web.BaseRequest, response: web.StreamResponse) -> None:
        assert isinstance(request, web.Request)
        seen.append((request.app, dict(request.match_info)))

    app.on_response_prepare.append(look)
    client = await aiohttp_client(GatewayTestServer(app))
    for path in ("/api/svc/echo/x", "/api/svc/echo/a/b/c?q=1", "/nowhere"):
        async with client.get(path) as response:
            await response.read()
    assert seen == [(app, {})] * 3


async def test_a_body_sent_after_100_continue_reaches_the_upstream(backend: TestServer) -> None:
    app = create_app(load_text(f'defaults: {{auth: none}}\nservices: {{svc: {{upstreams: ["{upstream(backend)}"]}}}}'))
    server = GatewayTestServer(app)
    await server.start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /api/svc/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"hello")
        response = await read_raw_response(reader, 5)
    finally:
        writer.close()
        await server.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    echoed = json.loads(response.partition(b"\r\n\r\n")[2])
    assert (echoed["body_length"], echoed["body_sha256"]) == (5, hashlib.sha256(b"hello").hexdigest())


async def test_a_gateway_app_given_app_middlewares_refuses_to_serve_rather_than_skip_them() -> None:
    app = create_app(load_text('defaults: {auth: none}\nservices: {svc: {upstreams: ["http://127.0.0.1:1"]}}'))
    app.middlewares.append(web.normalize_path_middleware())
    server = GatewayTestServer(app)
    with pytest.raises(ValueError, match=r"app\.middlewares would be skipped"):
        await server.start_server()
    await server.close()
