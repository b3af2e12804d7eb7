"""``make_client(*chain)``: an app with the app-level middlewares plus ``chain``, answering 200 "ok"."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from middleware import base
from middleware.base import Middleware
from middleware.problem import ProblemMiddleware
from middleware.request_id import RequestIdMiddleware

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


async def ok(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


@pytest.fixture
def make_client(aiohttp_client) -> MakeClient:  # type: ignore[no-untyped-def]
    async def make(*chain: Middleware, handler=ok) -> TestClient[web.Request, web.Application]:  # type: ignore[no-untyped-def]
        app = web.Application(middlewares=[RequestIdMiddleware(), ProblemMiddleware(), *chain])
        base.install(app)
        app.router.add_route("*", "/{tail:.*}", handler)
        return await aiohttp_client(app)

    return make
