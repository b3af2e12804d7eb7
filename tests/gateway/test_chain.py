"""The route chain's shape (gateway/chain.py): what a request passes through, and how deep it waits.

A request waits four or five times on its way (its rate-limit take, its cache lookup, the
upstream's answer, its cache write), and every resume passes through each coroutine frame
between aiohttp's handler and the wait: the chain keeps that path short (bench/README.md,
fourteenth session).
"""

from __future__ import annotations

import asyncio
import time
from types import CoroutineType
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.chain import AccessSteps
from middleware.problem import Problem
from tests.conftest import JWT_TEST_SECRET, MakeGateway, upstream

YAML = """
jwt:
  secret: ${{JWT_SECRET}}
defaults: {{auth: required, rate_limit: {{requests: 100, per: 1m, key: sub}}, cache: {{ttl: 30s}}}}
services:
  svc:
    upstreams: ["{upstream}"]
"""


def _our_frames(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines the task is suspended in, outer to inner, those of gateway/ and middleware/ only."""
    names = []
    coro: Any = task.get_coro()
    while isinstance(coro, CoroutineType):
        if "/gateway/" in coro.cr_code.co_filename or "/middleware/" in coro.cr_code.co_filename:
            names.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return names


async def test_a_full_chain_request_waits_for_its_upstream_through_seven_frames(
    make_gateway: MakeGateway, backend: TestServer
) -> None:
    gateway = await make_gateway(YAML, upstream=upstream(backend))
    now = int(time.time())
    authorization = {"Authorization": "Bearer " + jwt.encode({"sub": "alice", "exp": now + 600}, JWT_TEST_SECRET)}
    first = await gateway.get("/api/svc/echo", headers=authorization)  # the upstream connection, kept alive
    assert first.status == 200
    sent = asyncio.create_task(gateway.get("/api/svc/slow/0.5", headers=authorization))
    deadline = asyncio.get_running_loop().time() + 5
    waiting: list[list[str]] = []
    while not waiting and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        waiting = [f for f in map(_our_frames, asyncio.all_tasks()) if "RouteProxy.__call__" in f]
    # Auth and the rate limit are done by now (access steps, no frame left); the app-wide
    # request id and problem rendering are one frame; dispatch hands the chain on without one.
    assert waiting == [
        [
            "RequestIdMiddleware.__call__",
            "AccessSteps.__call__",
            "CacheMiddleware.__call__",
            "CacheMiddleware._miss",
            "CacheMiddleware._fetch",
            "RouteProxy.__call__",
            "_Connection.exchange",
        ]
    ]
    response = await sent
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"
    assert response.headers["X-RateLimit-Remaining"] == "98"


async def test_access_steps_run_in_order_before_the_handler() -> None:
    seen: list[str] = []

    async def step(name: str, request: web.Request) -> None:
        seen.append(name)

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append("handler")
        return web.Response(text="ok")

    steps = AccessSteps([lambda r: step("auth", r), lambda r: step("limit", r)], handler)
    response = await steps(object())  # type: ignore[arg-type]
    assert seen == ["auth", "limit", "handler"]
    assert response.text == "ok"


async def test_a_refusing_access_step_stops_the_chain() -> None:
    seen: list[str] = []

    async def refuse(request: web.Request) -> None:
        raise Problem(429, "slow down")

    async def never(request: web.Request) -> None:
        seen.append("later step")

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append("handler")
        return web.Response()

    with pytest.raises(Problem):
        await AccessSteps([refuse, never], handler)(object())  # type: ignore[arg-type]
    assert seen == []
