"""Rate limits through real gateway processes sharing one store (DESIGN §6, §9)."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import upstream
from tests.redis_servers import RedisServer

from .conftest import StartGateway

YAML = """
store: {{url: "{store}", on_error: {on_error}, timeout: {timeout}}}
defaults: {{auth: none, rate_limit: {{requests: {requests}, per: 1m, key: ip}}}}
services:
  svc:
    upstreams: ["{upstream}"]
    routes:
      - {{path: /status/*, rate_limit: off}}
"""


async def _statuses(session: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    async def one(url: str) -> int:
        async with session.get(url) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one(url) for url in urls)))


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_three_gateways_on_one_redis_admit_exactly_the_budget(
    start_gateway: StartGateway, backend: TestServer, request: pytest.FixtureRequest, kind: str
) -> None:
    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster")
    # a generous store timeout: this test is about counts on a busy machine, not about timeouts
    text = YAML.format(store=url, on_error="deny", requests=20, upstream=upstream(backend), timeout="2s")
    text = text.replace("svc:", f"svc-{uuid.uuid4().hex[:6]}:")  # a fresh budget on the shared Redis
    service = text.split("  svc-")[1].split(":")[0]
    gateways = [start_gateway(text) for _ in range(3)]
    urls = [f"{gateways[i % 3].url}/api/svc-{service}/echo/x" for i in range(45)]
    async with aiohttp.ClientSession() as session:
        statuses = await _statuses(session, urls)
    assert statuses.count(200) == 20
    assert statuses.count(429) == 25


async def test_memory_store_limits_each_gateway_on_its_own(start_gateway: StartGateway, backend: TestServer) -> None:
    text = YAML.format(store="memory://", on_error="allow", requests=5, upstream=upstream(backend), timeout="200ms")
    one, two = start_gateway(text), start_gateway(text)
    async with aiohttp.ClientSession() as session:
        first = await _statuses(session, [f"{one.url}/api/svc/echo/x"] * 7)
        second = await _statuses(session, [f"{two.url}/api/svc/echo/x"] * 7)
    assert first.count(200) == second.count(200) == 5


async def test_headers_on_proxied_rejected_and_unlimited_routes(
    start_gateway: StartGateway, backend: TestServer, redis_url: str
) -> None:
    text = YAML.format(store=redis_url, on_error="deny", requests=2, upstream=upstream(backend), timeout="2s")
    text = text.replace("svc:", "hdr:").replace("  hdr:", f"  hdr{uuid.uuid4().hex[:6]}:")
    service = text.split("  hdr")[1].split(":")[0]
    gateway = start_gateway(text)
    base = f"{gateway.url}/api/hdr{service}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/echo/x") as ok:
            assert ok.status == 200
            assert (ok.headers["X-RateLimit-Limit"], ok.headers["X-RateLimit-Remaining"]) == ("2", "1")
            assert ok.headers["RateLimit-Policy"].endswith(";q=2;w=60")
        async with session.get(f"{base}/echo/x"):
            pass
        async with session.get(f"{base}/echo/x") as rejected:
            assert rejected.status == 429
            assert rejected.headers["Content-Type"] == "application/problem+json"
            assert rejected.headers["X-RateLimit-Remaining"] == "0"
            assert int(rejected.headers["Retry-After"]) == 30
        async with session.get(f"{base}/status/200") as unlimited:
            assert unlimited.status == 200
            assert "X-RateLimit-Limit" not in unlimited.headers


@pytest.mark.parametrize(("on_error", "while_down"), [("allow", 200), ("deny", 503), ("local", 200)])
async def test_redis_killed_and_restarted_under_each_on_error(
    start_gateway: StartGateway, backend: TestServer, restartable_redis: RedisServer, on_error: str, while_down: int
) -> None:
    text = YAML.format(
        store=restartable_redis.url, on_error=on_error, requests=3, upstream=upstream(backend), timeout="200ms"
    )
    gateway = start_gateway(text)
    url = f"{gateway.url}/api/svc/echo/x"
    async with aiohttp.ClientSession() as session:
        assert await _statuses(session, [url]) == [200]
        restartable_redis.stop(kill=True)
        down = await asyncio.wait_for(_statuses(session, [url] * 2), timeout=5)  # never hangs
        assert down == [while_down] * 2
        restartable_redis.start()
        await asyncio.sleep(0.3)
        back = [(await _statuses(session, [url]))[0] for _ in range(4)]  # in order
    assert back == [200, 200, 200, 429]  # limiting resumes without a restart (on a Redis that lost its data)
    assert gateway.process.poll() is None
