"""What an idle keep-alive client connection holds: nothing of the exchange it finished
(bench/README.md, memory per idle keep-alive connection; issue 8)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_text
from tests.conftest import GatewayTestServer, upstream


async def test_a_finished_exchange_leaves_its_request_state_and_response_headers_behind(  # type: ignore[no-untyped-def]
    aiohttp_client, backend: TestServer
) -> None:
    app = create_app(load_text(f'defaults: {{auth: none}}\nservices: {{svc: {{upstreams: ["{upstream(backend)}"]}}}}'))
    exchanges: list[tuple[web.BaseRequest, web.StreamResponse]] = []

    async def remember(request: web.BaseRequest, response: web.StreamResponse) -> None:
        exchanges.append((request, response))

    app.on_response_prepare.append(remember)
    client = await aiohttp_client(GatewayTestServer(app))
    for _ in range(2):  # the second request comes on the same kept-alive connection
        async with client.get("/api/svc/echo/x") as response:
            assert response.status == 200 and "X-Request-ID" in response.headers
            await response.read()
    assert client.session.connector is not None and len(client.session.connector._conns) == 1
    assert len(exchanges) == 2
    for request, sent in exchanges:
        assert dict(request) == {}  # the middlewares' outcome, ids and pending headers
        assert len(sent.headers) == 0
