"""The proxy against real backends: what a client sees is what the backend sent (DESIGN §5)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.backends import BACKEND_STATE, GZIP_BODY, echo_app
from tests.conftest import REFUSED, GatewayClient, MakeGateway, upstream
from tests.rawhttp import raw_request
from tests.rawserver import RawServer, answering

YAML = """
defaults: {{auth: none, timeout: 1s, connect_timeout: 1s}}
trusted_proxies: [{trusted}]
limits: {{max_body: 1MiB}}
services:
  svc: {{upstreams: ["{upstream}"]}}
"""


@pytest.fixture
async def gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=upstream(backend), trusted="10.0.0.0/8")


def _headers(echoed: dict[str, object]) -> dict[str, str]:
    return {k.lower(): v for k, v in echoed["headers"]}  # type: ignore[attr-defined]


async def test_request_goes_to_the_upstream_path_with_the_query_byte_exact(gateway: GatewayClient) -> None:
    response = await gateway.get(aiohttp.client.URL("/api/svc/echo/a/b?x=%20y&z=1&z=2&%7e=+&e", encoded=True))
    assert response.status == 200
    assert (await response.json())["raw_path"] == "/echo/a/b?x=%20y&z=1&z=2&%7e=+&e"


async def test_upstream_path_prefix_is_prepended(make_gateway: MakeGateway, aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def show(request: web.Request) -> web.Response:
        return web.Response(text=request.raw_path)

    app = web.Application()
    app.router.add_get("/{tail:.*}", show)
    prefixed = await aiohttp_server(app)
    client = await make_gateway(YAML, upstream=upstream(prefixed) + "/v1/", trusted="10.0.0.0/8")
    assert await (await client.get("/api/svc/users/7?full=1")).text() == "/v1/users/7?full=1"
    assert await (await client.get("/api/svc")).text() == "/v1"


async def test_request_body_and_method_reach_the_upstream(gateway: GatewayClient) -> None:
    body = json.dumps({"name": "dave"}).encode()
    response = await gateway.patch("/api/svc/echo/x", data=body, headers={"Content-Type": "application/json"})
    echoed = await response.json()
    assert echoed["method"] == "PATCH"
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert _headers(echoed)["content-type"] == "application/json"


async def test_chunked_request_body_streams_to_the_upstream(gateway: GatewayClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(20):
            yield bytes([i]) * 10_000

    response = await gateway.post("/api/svc/upload", data=chunks())
    expected = b"".join(bytes([i]) * 10_000 for i in range(20))
    assert await response.json() == {"length": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}


async def test_gzip_bytes_pass_through_undecoded(gateway: GatewayClient) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(gateway.make_url("/api/svc/gzip"), headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == GZIP_BODY


async def test_several_set_cookie_headers_survive(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/cookies")
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


@pytest.mark.parametrize("status", [200, 201, 400, 404, 418, 500, 503])
async def test_upstream_status_and_body_are_untouched(gateway: GatewayClient, status: int) -> None:
    response = await gateway.get(f"/api/svc/status/{status}")
    assert response.status == status
    assert await response.text() == f"status {status}\n"
    assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_have_no_body(gateway: GatewayClient, status: int) -> None:
    response = await gateway.get(f"/api/svc/status/{status}")
    assert response.status == status
    assert await response.read() == b""


async def test_head_gets_content_length_and_no_body(gateway: GatewayClient) -> None:
    response = await gateway.head("/api/svc/head-only")
    assert response.status == 200
    assert response.headers["Content-Length"] == "3"
    assert await response.read() == b""


async def test_redirects_are_not_followed(gateway: GatewayClient, backend: TestServer) -> None:
    response = await gateway.get("/api/svc/redirect", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/echo/target"
    assert backend.app[BACKEND_STATE].hits["/echo/target"] == 0


async def test_chunked_response_streams_before_the_upstream_finishes(
    gateway: GatewayClient, backend: TestServer
) -> None:
    response = await gateway.get("/api/svc/stream-hold")
    assert response.status == 200
    first = await asyncio.wait_for(response.content.readuntil(b"\n"), timeout=5)
    assert first == b"chunk-0\n"  # arrived while the upstream is still holding the rest back
    backend.app[BACKEND_STATE].release.set()
    assert await response.read() == b"chunk-1\n"


async def test_response_hop_by_hop_headers_are_removed(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/hop")
    assert response.headers["X-Kept"] == "yes"
    for name in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert name not in response.headers, name
    assert await response.text() == "hop\n"


async def test_request_hop_by_hop_headers_are_removed(gateway: GatewayClient) -> None:
    sent = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eDp5",
        "Upgrade": "h2c",
        "X-Kept": "yes",
    }
    echoed = _headers(await (await gateway.get("/api/svc/echo/x", headers=sent)).json())
    assert echoed["x-kept"] == "yes"
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in echoed, name
    assert echoed.get("connection", "keep-alive") == "keep-alive"  # aiohttp's own, to the upstream


async def test_lower_case_hop_by_hop_headers_are_removed_both_ways(make_gateway: MakeGateway) -> None:
    hop = "connection: x-private-hop\r\nx-private-hop: 1\r\nkeep-alive: 5\r\n"
    upstream_response = f"HTTP/1.1 200 OK\r\n{hop}x-kept: yes\r\ncontent-length: 3\r\n\r\nhop".encode()
    server = await RawServer(answering(lambda request: upstream_response)).start()
    try:
        client = await make_gateway(YAML, upstream=str(server.origin), trusted="10.0.0.0/8")
        response = await raw_request(client.server.port, "/api/svc/x", headers=hop + "x-kept: yes\r\n")
        assert (response.status, response.body) == (200, b"hop")
        assert response.header("x-kept") == "yes"
        assert response.header("x-private-hop") is None and response.header("keep-alive") is None
        sent = {name.lower(): value for name, value in server.peers[0].requests[0].headers}
        assert sent["x-kept"] == "yes"
        assert "x-private-hop" not in sent and "keep-alive" not in sent
        assert "x-private-hop" not in sent.get("connection", "").lower()
    finally:
        await server.close()


async def test_many_response_headers_pass(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/headers-big")
    assert sum(1 for name in response.headers if name.startswith("X-H-")) == 50


async def test_forwarded_headers_are_added(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/x", headers={"Host": "api.example.com", "X-Request-ID": "rid-7"})
    echoed = _headers(await response.json())
    assert echoed["x-forwarded-for"] == "127.0.0.1"
    assert echoed["x-forwarded-proto"] == "http"
    assert echoed["x-forwarded-host"] == "api.example.com"
    assert echoed["x-request-id"] == "rid-7"
    assert response.headers["X-Request-ID"] == "rid-7"


async def test_generated_request_id_is_sent_upstream_and_echoed(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/x")
    assert _headers(await response.json())["x-request-id"] == response.headers["X-Request-ID"]


async def test_untrusted_client_cannot_spoof_forwarded_headers(gateway: GatewayClient) -> None:
    spoofed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil",
        "Forwarded": "for=6.6.6.6",
    }
    echoed = _headers(await (await gateway.get("/api/svc/echo/x", headers=spoofed)).json())
    assert echoed["x-forwarded-for"] == "127.0.0.1"
    assert echoed["x-forwarded-proto"] == "http"
    assert echoed["x-forwarded-host"] != "evil"
    assert "forwarded" not in echoed


async def test_trusted_proxy_forwarded_for_is_appended(make_gateway: MakeGateway, backend: TestServer) -> None:
    client = await make_gateway(YAML, upstream=upstream(backend), trusted="127.0.0.1/32")
    sent = {"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https"}
    echoed = _headers(await (await client.get("/api/svc/echo/x", headers=sent)).json())
    assert echoed["x-forwarded-for"] == "203.0.113.5, 127.0.0.1"
    assert echoed["x-forwarded-proto"] == "https"


async def test_upstream_gets_no_headers_the_client_did_not_send(gateway: GatewayClient) -> None:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as session:
        async with session.get(gateway.make_url("/api/svc/echo/x")) as response:
            echoed = _headers(await response.json())
    assert set(echoed) == {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}


# -- errors ----------------------------------------------------------------------------


async def _problem(response: aiohttp.ClientResponse, status: int) -> dict[str, object]:
    assert response.status == status
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, object] = await response.json()
    assert body["status"] == status and body["request_id"] == response.headers["X-Request-ID"]
    return body


async def test_refused_connection_is_502(make_gateway: MakeGateway) -> None:
    client = await make_gateway(YAML, upstream=REFUSED, trusted="10.0.0.0/8")
    await _problem(await client.get("/api/svc/x"), 502)


async def test_slow_upstream_is_504(gateway: GatewayClient) -> None:
    body = await _problem(await gateway.get("/api/svc/slow/3"), 504)
    assert "1s" in str(body["detail"])


async def test_body_over_max_body_is_413_before_the_upstream_is_called(
    gateway: GatewayClient, backend: TestServer
) -> None:
    await _problem(await gateway.post("/api/svc/upload", data=io.BytesIO(b"x" * (1024 * 1024 + 1))), 413)
    assert backend.app[BACKEND_STATE].hits["/upload"] == 0


async def test_chunked_body_over_max_body_is_413_and_never_completes_upstream(
    make_gateway: MakeGateway,
    aiohttp_server,  # type: ignore[no-untyped-def]
) -> None:
    completed: list[int] = []

    async def upload(request: web.Request) -> web.Response:
        completed.append(len(await request.read()))
        return web.Response(text="stored")

    app = web.Application(client_max_size=100 * 1024 * 1024)
    app.router.add_post("/upload", upload)
    server = await aiohttp_server(app)
    client = await make_gateway(YAML, upstream=upstream(server), trusted="10.0.0.0/8")

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, over the 1 MiB limit

    await _problem(await client.post("/api/svc/upload", data=chunks()), 413)
    await asyncio.sleep(0.1)
    assert completed == []


async def test_websocket_upgrade_to_a_plain_service_is_refused(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/x", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    await _problem(response, 400)


async def test_gateway_keeps_serving_after_errors(gateway: GatewayClient) -> None:
    await gateway.get("/api/svc/slow/3")
    await gateway.get("/api/nope")
    assert (await gateway.get("/api/svc/status/200")).status == 200


async def test_backend_app_is_independent_per_test() -> None:
    assert echo_app()[BACKEND_STATE].requests == []


@pytest.mark.parametrize("framing", ["Content-Length: 100000", "Transfer-Encoding: chunked"])
async def test_upstream_dying_mid_body_cuts_the_client_connection(make_gateway: MakeGateway, framing: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        first = b"3e8\r\n" + b"x" * 1000 + b"\r\n" if "chunked" in framing else b"x" * 1000
        writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode() + first)
        await writer.drain()
        writer.transport.abort()  # die mid-body

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await make_gateway(YAML, upstream=f"http://127.0.0.1:{port}", trusted="10.0.0.0/8")
        response = await client.get("/api/svc/x")
        assert response.status == 200  # the status line was already on its way
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), timeout=5)
        assert (await client.get("/api/nope")).status == 404  # and the gateway goes on serving
    finally:
        server.close()
        await server.wait_closed()


async def test_small_response_cut_short_by_the_upstream_is_a_502(make_gateway: MakeGateway) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await make_gateway(YAML, upstream=f"http://127.0.0.1:{port}", trusted="10.0.0.0/8")
        response = await client.get("/api/svc/x")
        await _problem(response, 502)  # small bodies are read whole first, so there is still time to say so
    finally:
        server.close()
        await server.wait_closed()
