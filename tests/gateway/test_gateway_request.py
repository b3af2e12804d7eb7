"""The requests the gateway's server makes (``GatewayRequest``): aiohttp's, with a ``get`` that
answers as any mapping's does without raising and catching ``KeyError`` for an absent key."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_text
from gateway.server import GatewayRequest
from middleware.base import CLAIMS, OUTCOME, REQUEST_ID
from tests.conftest import GatewayTestServer, upstream

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
