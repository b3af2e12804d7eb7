"""The rate-limit middleware: whose budget, what the client is told, and a dead store (DESIGN §6).

Behaviour tests run on the memory store and on a real Redis; the arithmetic itself is the
store contract's business (tests/stores)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.config import StoreConfig
from gateway.stores import MemoryStore, open_store
from middleware.base import CLAIMS, Handler, Store
from middleware.problem import ProblemMiddleware
from middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from middleware.request_id import RequestIdMiddleware
from middleware.schema import ConfigError, Section
from tests.redis_servers import RedisServer

from .conftest import MakeClient, ok


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param({"requests": 0, "per": "1s"}, "rate_limit.requests: must be >= 1", id="zero budget"),
        pytest.param({"requests": 5, "per": "0s"}, "rate_limit.per: must be greater than 0", id="zero period"),
        pytest.param({"requests": 5, "per": "1s", "bursts": 2}, "rate_limit.bursts: unknown key", id="typo"),
        pytest.param({"requests": 5, "per": "1s", "key": "cookie"}, "rate_limit.key: expected ip, sub", id="bad key"),
        pytest.param({"requests": 5, "per": "1s", "key": "header:"}, "rate_limit.key: expected ip", id="no header"),
        pytest.param({"per": "1s"}, "rate_limit.requests: required key is missing", id="no requests"),
    ],
)
def test_config_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RateLimitConfig.parse(Section.single("rate_limit", raw))


def test_off_means_no_limit() -> None:
    assert RateLimitConfig.parse(Section.single("rate_limit", "off")) is None


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        store: Store = MemoryStore(1024 * 1024)
    else:
        url = request.getfixturevalue("redis_url")
        store = open_store(StoreConfig(url=url, timeout=0.5), namespace=f"t-{uuid.uuid4().hex[:8]}:")
    yield store
    await store.aclose()


def limiter(store: Store, requests: int = 3, per: float = 60, key: str = "ip", **kwargs: object) -> RateLimitMiddleware:
    return RateLimitMiddleware(RateLimitConfig(requests=requests, per=per, key=key), store=store, scope="t", **kwargs)  # type: ignore[arg-type]


async def test_burst_gets_exactly_the_budget(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=3))
    statuses = [(await client.get("/")).status for _ in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]


async def test_concurrent_burst_gets_exactly_the_budget(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=10))
    responses = await asyncio.gather(*(client.get("/") for _ in range(25)))
    assert sorted(r.status for r in responses).count(200) == 10


async def test_headers_count_down_on_every_response(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=3, per=60))
    seen = []
    for _ in range(3):
        response = await client.get("/")
        seen.append(response.headers["X-RateLimit-Remaining"])
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert 0 < int(response.headers["X-RateLimit-Reset"]) <= 60
        assert response.headers["RateLimit-Policy"] == '"t";q=3;w=60'
    assert seen == ["2", "1", "0"]
    assert response.headers["RateLimit"].startswith('"t";r=0;t=')


async def test_rejection_is_429_problem_with_retry_after(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=2, per=60))
    await client.get("/")
    await client.get("/")
    response = await client.get("/")
    assert response.status == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert (await response.json())["status"] == 429
    assert response.headers["Retry-After"] == "30"  # one request every 30 s refills
    assert response.headers["X-RateLimit-Remaining"] == "0"


async def test_request_after_retry_after_is_admitted(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=2, per=1))
    await client.get("/")
    await client.get("/")
    rejected = await client.get("/")
    assert rejected.status == 429
    await asyncio.sleep(int(rejected.headers["Retry-After"]))
    assert (await client.get("/")).status == 200


async def test_error_responses_carry_the_headers_too(make_client: MakeClient, store: Store) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="down")

    client = await make_client(limiter(store), handler=fail)
    response = await client.get("/")
    assert response.status == 503 and response.headers["X-RateLimit-Remaining"] == "2"


async def test_each_client_address_has_its_own_budget(aiohttp_client, store: Store) -> None:  # type: ignore[no-untyped-def]
    trusted = [ipaddress.ip_network("127.0.0.1/32")]
    app = web.Application(
        middlewares=[RequestIdMiddleware(trusted_proxies=trusted), ProblemMiddleware(), limiter(store, requests=1)]
    )
    app.router.add_get("/", ok)
    client = await aiohttp_client(app)
    a = [(await client.get("/", headers={"X-Forwarded-For": "203.0.113.1"})).status for _ in range(2)]
    b = [(await client.get("/", headers={"X-Forwarded-For": "203.0.113.2"})).status for _ in range(2)]
    assert a == b == [200, 429]


async def test_spoofed_forwarded_for_from_an_untrusted_peer_buys_no_budget(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(limiter(store, requests=2))  # no trusted proxies
    statuses = [(await client.get("/", headers={"X-Forwarded-For": f"198.51.100.{i}"})).status for i in range(4)]
    assert statuses == [200, 200, 429, 429]


def _claims(request: web.Request) -> dict[str, object] | None:
    user = request.headers.get("X-Test-User")
    return None if user is None else {"sub": user, "tenant": user.split("@")[-1]}


@web.middleware
async def fake_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stands in for the JWT middleware (tested on its own): leaves verified claims on the request."""
    claims = _claims(request)
    if claims is not None:
        request[CLAIMS] = claims
    return await handler(request)


@pytest.mark.parametrize(
    ("key", "first", "second", "same_budget"),
    [
        pytest.param("sub", {"X-Test-User": "alice@a"}, {"X-Test-User": "bob@a"}, False, id="sub: per subject"),
        pytest.param("claim:tenant", {"X-Test-User": "alice@a"}, {"X-Test-User": "bob@a"}, True, id="claim: shared"),
        pytest.param("claim:tenant", {"X-Test-User": "alice@a"}, {"X-Test-User": "carol@c"}, False, id="claim: per"),
        pytest.param("header:X-Api-Key", {"X-Api-Key": "k1"}, {"X-Api-Key": "k2"}, False, id="header: per value"),
        pytest.param("header:X-Api-Key", {"X-Api-Key": "k1"}, {"X-Api-Key": "k1"}, True, id="header: same value"),
        pytest.param("sub", {}, {}, True, id="sub: anonymous share the address budget"),
    ],
)
async def test_key_kinds(
    make_client: MakeClient, store: Store, key: str, first: dict[str, str], second: dict[str, str], same_budget: bool
) -> None:
    client = await make_client(fake_auth, limiter(store, requests=1, key=key))
    assert (await client.get("/", headers=first)).status == 200
    assert (await client.get("/", headers=second)).status == (429 if same_budget else 200)


async def test_missing_header_falls_back_to_the_address(make_client: MakeClient, store: Store) -> None:
    client = await make_client(limiter(store, requests=1, key="header:X-Api-Key"))
    assert (await client.get("/")).status == 200
    assert (await client.get("/")).status == 429  # leaving the header out buys nothing


async def test_routes_have_separate_budgets(make_client: MakeClient, store: Store) -> None:
    one = RateLimitMiddleware(RateLimitConfig(requests=1, per=60), store=store, scope="one")
    two = RateLimitMiddleware(RateLimitConfig(requests=1, per=60), store=store, scope="two")
    client_one = await make_client(one)
    client_two = await make_client(two)
    assert (await client_one.get("/")).status == 200
    assert (await client_two.get("/")).status == 200


# -- the store is down ----------------------------------------------------------------------


@pytest.fixture
async def dead_store() -> AsyncIterator[Store]:
    store = open_store(StoreConfig(url="redis://127.0.0.1:1/0", timeout=0.05), namespace="t:")
    yield store
    await store.aclose()


async def test_store_down_allow_lets_requests_through_without_headers(
    make_client: MakeClient, dead_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(limiter(dead_store, on_error="allow"))
    with caplog.at_level(logging.WARNING, logger="middleware.rate_limit"):
        responses = [await client.get("/") for _ in range(5)]
    assert [r.status for r in responses] == [200] * 5
    assert "X-RateLimit-Limit" not in responses[0].headers
    warnings = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, not one per request


async def test_store_down_deny_is_503_problem(make_client: MakeClient, dead_store: Store) -> None:
    client = await make_client(limiter(dead_store, on_error="deny"))
    response = await client.get("/")
    assert response.status == 503
    assert response.headers["Content-Type"] == "application/problem+json"


async def test_store_down_local_limits_in_process(make_client: MakeClient, dead_store: Store) -> None:
    client = await make_client(limiter(dead_store, requests=2, on_error="local", fallback=MemoryStore(1 << 20)))
    statuses = [(await client.get("/")).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_limiting_resumes_when_redis_comes_back(make_client: MakeClient, restartable_redis: RedisServer) -> None:
    store = open_store(StoreConfig(url=restartable_redis.url, timeout=0.2), namespace=f"t-{uuid.uuid4().hex[:8]}:")
    try:
        client = await make_client(limiter(store, requests=2, on_error="deny"))
        assert (await client.get("/")).status == 200
        restartable_redis.stop(kill=True)
        assert (await client.get("/")).status == 503
        restartable_redis.start()
        statuses = [(await client.get("/")).status for _ in range(3)]
        assert statuses == [200, 200, 429]  # the budget starts over on a Redis that lost its data
    finally:
        await store.aclose()
