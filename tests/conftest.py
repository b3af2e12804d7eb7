"""Shared fixtures: free ports, real backends, gateways built from YAML text."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import load_text
from gateway.server import GatewayRunner
from tests.backends import echo_app

pytest_plugins = ["tests.redis_servers"]  # redis_server, restartable_redis, redis_cluster


# Nothing listens on port 1: a connection there is refused at once. A free_port() is not a dead
# upstream: the OS may hand the same port to a server the test starts afterwards (the gateway's own).
REFUSED = "http://127.0.0.1:1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on ``port`` (synchronous: for subprocess fixtures)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


# -- gateway fixtures ------------------------------------------------------------------


GatewayClient = TestClient[web.Request, web.Application]
MakeGateway = Callable[..., Awaitable[GatewayClient]]

JWT_TEST_SECRET = "test-secret-0123456789-0123456789"


@pytest.fixture
async def backend(aiohttp_server) -> TestServer:  # type: ignore[no-untyped-def]
    """A real echo backend on a free port; ``backend.app[BACKEND_STATE]`` shows what it saw."""
    server: TestServer = await aiohttp_server(echo_app())
    return server


@pytest.fixture
def make_gateway(aiohttp_client) -> MakeGateway:  # type: ignore[no-untyped-def]
    """``await make_gateway(yaml_text, **format_args)``: a real gateway app from routes.yaml text,
    served by the production runner (its connection handling, and the hit lane).

    ``{backend}`` style placeholders in the text are filled from ``format_args`` (use
    ``{{``/``}}`` for literal braces in flow mappings, or pass plain text without args).
    """

    async def make(text: str, **format_args: object) -> GatewayClient:
        if format_args:
            text = text.format(**format_args)
        config = load_text(text, env={"JWT_SECRET": JWT_TEST_SECRET})
        client: GatewayClient = await aiohttp_client(GatewayTestServer(create_app(config)))
        return client

    return make


class GatewayTestServer(TestServer):
    """A test server on the production runner (``GatewayRunner``: its protocol, its limits, the hit lane)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs.setdefault("access_log", None)  # as `gateway run`: the gateway writes its own access log
        return GatewayRunner(self.app, **kwargs)


def upstream(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"
