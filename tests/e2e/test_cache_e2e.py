"""The cache through real gateway processes sharing one Redis (DESIGN §6, §9): one entry for
all of them, one upstream request for concurrent misses across them, invalidation anywhere."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
from aiohttp.test_utils import TestServer

from tests.conftest import upstream
from tests.gateway.cache_backend import CACHE_BACKEND, cache_backend_app

from .conftest import StartGateway

YAML = """
store: {{url: "{store}", timeout: 0.5}}
defaults: {{auth: none}}
services:
  {name}:
    upstreams: ["{upstream}"]
    cache: {{ttl: 30s}}
"""
HOST = {"Host": "api.test"}  # as behind one load balancer: Host is part of the key


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    async with session.get(url, headers=HOST) as response:
        assert response.status == 200
        return response.headers["X-Cache"], await response.text()


async def test_two_gateways_on_one_redis_share_entries(  # type: ignore[no-untyped-def]
    start_gateway: StartGateway, aiohttp_server, redis_url: str
) -> None:
    server: TestServer = await aiohttp_server(cache_backend_app())
    hits = server.app[CACHE_BACKEND].hits
    name = f"s{uuid.uuid4().hex[:8]}"
    text = YAML.format(store=redis_url, name=name, upstream=upstream(server))
    one, two = start_gateway(text), start_gateway(text)
    async with aiohttp.ClientSession() as session:
        first = await _get(session, f"{one.url}/api/{name}/shared")
        second = await _get(session, f"{two.url}/api/{name}/shared")
        assert first[0] == "MISS"
        assert second == ("HIT", first[1])
        async with session.delete(f"{two.url}/api/{name}/shared", headers=HOST) as response:
            assert response.status == 200
        assert (await _get(session, f"{one.url}/api/{name}/shared"))[0] == "MISS"
        assert hits["GET /shared"] == 2

        urls = [f"{gateway.url}/api/{name}/slow?delay=0.5" for _ in range(10) for gateway in (one, two)]
        results = await asyncio.gather(*(_get(session, url) for url in urls))
        assert hits["GET /slow"] == 1
        assert len({body for _, body in results}) == 1
        assert sorted(result for result, _ in results) == ["HIT"] * 19 + ["MISS"]
