"""A reload closes the keep-alive connections of the upstreams it retires, and only those (DESIGN §8).

In process: a gateway app with a :class:`gateway.reload.Reloader` on a routes.yaml in a
temporary directory, reloaded by hand; the upstreams are raw servers that see each
connection the gateway opens, and when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from gateway import reload
from gateway.app import create_app
from gateway.config import load_text
from tests.conftest import GatewayClient
from tests.rawserver import Peer, RawServer, ServerRequest, answering, response

WAIT = 10.0

YAML = """
defaults: {{auth: none, timeout: 5s, connect_timeout: 5s}}
services:
{services}"""


def service(name: str, *servers: RawServer) -> str:
    upstreams = ", ".join(f'"{server.origin}"' for server in servers)
    return f"  {name}: {{upstreams: [{upstreams}]}}\n"


def write(path: Path, text: str) -> None:
    path.write_text(text)


def named(name: str) -> RawServer:
    return RawServer(answering(lambda request: response(f"{name} {request.target}".encode())))


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, RawServer]]:
    servers = {name: await named(name).start() for name in ("kept", "removed", "old", "new")}
    yield servers
    for server in servers.values():
        await server.close()


async def start(aiohttp_client: AiohttpClient, path: Path, text: str) -> tuple[GatewayClient, reload.Reloader]:
    write(path, text)
    app = create_app(load_text(text))
    reloader = reload.install(app, path, watch=False)
    client = await aiohttp_client(app)
    return client, reloader


async def get(client: GatewayClient, path: str) -> str:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    return await response.text()


def targets(requests: list[ServerRequest]) -> list[str]:
    return [request.target for request in requests]


async def test_reload_closes_the_connection_to_a_removed_service_and_keeps_the_others(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    backends: dict[str, RawServer],
) -> None:
    kept, removed = backends["kept"], backends["removed"]
    path = tmp_path / "routes.yaml"
    client, reloader = await start(
        aiohttp_client, path, YAML.format(services=service("kept", kept) + service("removed", removed))
    )
    assert await get(client, "/api/kept/1") == "kept /1"
    assert await get(client, "/api/removed/1") == "removed /1"
    kept_connection, removed_connection = await kept.peer(0), await removed.peer(0)

    write(path, YAML.format(services=service("kept", kept)))
    assert await reloader.reload("admin")

    await asyncio.wait_for(removed_connection.client_closed.wait(), WAIT)  # the backend sees it end
    assert (await client.get("/api/removed/2")).status == 404
    assert await get(client, "/api/kept/2") == "kept /2"
    assert len(kept.peers) == 1 and not kept_connection.client_closed.is_set()  # the same connection, still open
    assert targets(kept_connection.requests) == ["/1", "/2"]


async def test_reload_that_changes_a_service_upstream_closes_the_old_connection(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    backends: dict[str, RawServer],
) -> None:
    old, new = backends["old"], backends["new"]
    path = tmp_path / "routes.yaml"
    client, reloader = await start(aiohttp_client, path, YAML.format(services=service("svc", old)))
    assert await get(client, "/api/svc/1") == "old /1"
    old_connection = await old.peer(0)

    write(path, YAML.format(services=service("svc", new)))
    assert await reloader.reload("admin")

    await asyncio.wait_for(old_connection.client_closed.wait(), WAIT)
    assert await get(client, "/api/svc/2") == "new /2"


async def test_reload_lets_a_response_in_flight_on_a_removed_service_finish(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    backends: dict[str, RawServer],
) -> None:
    rest = asyncio.Event()

    async def slow_body(peer: Peer) -> None:
        await peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")  # streamed through
        await peer.drain()
        await rest.wait()
        peer.send(b"5\r\nworld\r\n0\r\n\r\n")
        await peer.until_client_closes()

    backend = await RawServer(slow_body).start()
    try:
        path = tmp_path / "routes.yaml"
        client, reloader = await start(aiohttp_client, path, YAML.format(services=service("svc", backend)))
        response = await client.get("/api/svc/x")
        assert await asyncio.wait_for(response.content.readexactly(5), WAIT) == b"hello"

        write(path, YAML.format(services=service("other", backends["kept"])))
        assert await reloader.reload("admin")
        rest.set()

        assert await asyncio.wait_for(response.read(), WAIT) == b"world"  # finished on the retired pool
        await asyncio.wait_for((await backend.peer(0)).client_closed.wait(), WAIT)  # then closed
    finally:
        await backend.close()
