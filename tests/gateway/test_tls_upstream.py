"""https upstreams (DESIGN §5): the certificate verified against the system's CAs, with the
upstream's host name; the gateway trusts another bundle through ``SSL_CERT_FILE``, as OpenSSL
does. A handshake that fails is a 502 that says so, for plain requests and WebSocket upgrades.

The backends are the real echo app on TLS, with certificates from a throwaway CA (trustme).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from tests.backends import BACKEND_STATE, echo_app
from tests.conftest import GatewayClient, MakeGateway

YAML = """
services:
  svc:
    upstreams: ["{upstream}"]
    auth: none
    rate_limit: off
    websocket: true
"""

ServeTls = Callable[[trustme.LeafCert], Awaitable[TestServer]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def serve_tls() -> AsyncIterator[ServeTls]:
    """``await serve_tls(cert)``: the echo backend on https with ``cert``; closed after the test."""
    servers: list[TestServer] = []

    async def serve(cert: trustme.LeafCert) -> TestServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        server = TestServer(echo_app())
        await server.start_server(ssl=context)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.close()


@pytest.fixture
async def tls_backend(ca: trustme.CA, serve_tls: ServeTls) -> TestServer:
    """The echo backend on https, its certificate issued for 127.0.0.1 by ``ca``."""
    return await serve_tls(ca.issue_cert("127.0.0.1"))


@pytest.fixture
def trusting(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's process trusts ``ca`` (set before the gateway, and its pools, are made)."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))


async def _gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=f"https://127.0.0.1:{backend.port}")


@pytest.mark.usefixtures("trusting")
async def test_an_https_upstream_is_reached_with_its_certificate_verified(
    make_gateway: MakeGateway, tls_backend: TestServer
) -> None:
    gateway = await _gateway(make_gateway, tls_backend)
    response = await gateway.get("/api/svc/echo/over-tls")
    assert response.status == 200
    assert (await response.json())["path"] == "/echo/over-tls"
    assert tls_backend.app[BACKEND_STATE].hits["/echo/over-tls"] == 1


async def test_an_untrusted_upstream_certificate_is_a_502_that_names_the_tls_failure(
    make_gateway: MakeGateway, tls_backend: TestServer
) -> None:
    gateway = await _gateway(make_gateway, tls_backend)  # the system's CAs only: ca is unknown
    response = await gateway.get("/api/svc/echo/x")
    assert response.status == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    detail = (await response.json())["detail"]
    assert "failed the TLS handshake" in detail and "certificate" in detail
    assert tls_backend.app[BACKEND_STATE].requests == []  # nothing was sent


@pytest.mark.usefixtures("trusting")
async def test_a_certificate_for_another_name_is_a_502(
    make_gateway: MakeGateway, ca: trustme.CA, serve_tls: ServeTls
) -> None:
    backend = await serve_tls(ca.issue_cert("upstream.example"))  # trusted, but not for 127.0.0.1
    gateway = await _gateway(make_gateway, backend)
    response = await gateway.get("/api/svc/echo/x")
    assert response.status == 502
    assert "failed the TLS handshake" in (await response.json())["detail"]
    assert backend.app[BACKEND_STATE].requests == []


@pytest.mark.usefixtures("trusting")
async def test_a_websocket_to_an_https_upstream_is_relayed(make_gateway: MakeGateway, tls_backend: TestServer) -> None:
    gateway = await _gateway(make_gateway, tls_backend)
    async with gateway.ws_connect("/api/svc/ws-echo", protocols=("echo",)) as ws:
        assert ws.protocol == "echo"
        await ws.send_str("over wss")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.TEXT, "over wss")
        await ws.send_bytes(b"\x00\x01")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.BINARY, b"\x00\x01")


async def test_a_websocket_to_an_untrusted_upstream_is_refused_with_a_502(
    make_gateway: MakeGateway, tls_backend: TestServer
) -> None:
    gateway = await _gateway(make_gateway, tls_backend)
    response = await gateway.get(
        "/api/svc/ws-echo",
        headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
    )  # fmt: skip
    assert response.status == 502
    assert "failed the TLS handshake" in (await response.json())["detail"]
    assert tls_backend.app[BACKEND_STATE].requests == []
