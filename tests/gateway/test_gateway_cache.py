"""The response cache wired into the gateway, on memory and on Redis (DESIGN §6, §9).

Every test runs a real gateway in front of a real backend that counts its hits
(:mod:`tests.gateway.cache_backend`); each test uses a service name of its own, so tests
sharing the session's Redis never see each other's entries.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import jwt
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import STORE
from gateway.stores import MemoryStore
from tests.conftest import JWT_TEST_SECRET, GatewayClient, MakeGateway, upstream
from tests.gateway.cache_backend import CACHE_BACKEND, CacheBackend, cache_backend_app

YAML = """
store: {{url: "{store}", timeout: 2s}}
jwt: {{secret: "${{JWT_SECRET}}", claims_headers: {{sub: X-User-Id}}}}
services:
  {name}:
    upstreams: ["{upstream}"]
    auth: {auth}
    retries: 0
    cache: {cache}
"""

Gateway = Callable[..., Awaitable[GatewayClient]]


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def cache_server(aiohttp_server) -> TestServer:  # type: ignore[no-untyped-def]
    server: TestServer = await aiohttp_server(cache_backend_app())
    return server


@pytest.fixture
def hits(cache_server: TestServer) -> CacheBackend:
    return cache_server.app[CACHE_BACKEND]


@pytest.fixture
def name() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gateway(make_gateway: MakeGateway, cache_server: TestServer, store_url: str, name: str) -> Gateway:
    """``await gateway(cache="{ttl: 30s}", auth="none")``: a gateway with one cached service."""

    async def make(cache: str = "{ttl: 30s}", auth: str = "none", up: str | None = None) -> GatewayClient:
        return await make_gateway(
            YAML, store=store_url, name=name, upstream=up or upstream(cache_server), auth=auth, cache=cache
        )

    return make


def token(sub: str) -> dict[str, str]:
    now = int(time.time())
    value = jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, JWT_TEST_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {value}"}


async def fetch(
    client: GatewayClient, path: str, method: str = "GET", **kwargs: object
) -> tuple[int, dict[str, str], bytes]:
    async with client.request(method, path, **kwargs) as response:  # type: ignore[arg-type]
        body = await response.read()
        return response.status, dict(response.headers), body


async def test_miss_then_hit_replays_byte_exact(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    async with client.get(f"/api/{name}/a?x=1") as first:
        first_body = await first.read()
        first_headers = [(k, v) for k, v in first.headers.items() if k not in ("Date", "X-Request-ID")]
        assert first.headers["X-Cache"] == "MISS"
        assert first.headers["Cache-Status"] == "gateway; fwd=miss; stored"
        assert "Age" not in first.headers
    async with client.get(f"/api/{name}/a?x=1") as second:
        assert second.status == first.status == 200
        assert await second.read() == first_body == b"/a#1 host=" + f"127.0.0.1:{client.port}".encode() + b" sub=None"
        assert second.headers["X-Cache"] == "HIT"
        assert second.headers["Cache-Status"] in ("gateway; hit; ttl=30", "gateway; hit; ttl=29")
        assert second.headers["Age"] in ("0", "1")
        assert second.headers.getall("X-Multi") == ["one", "two"]
        replayed = [(k, v) for k, v in second.headers.items() if k not in ("Date", "X-Request-ID", "Age")]
        swap = {"X-Cache": "HIT", "Cache-Status": second.headers["Cache-Status"]}
        assert replayed == [(k, swap.get(k, v)) for k, v in first_headers]
    assert hits.hits["GET /a"] == 1


async def test_head_is_served_from_the_get_entry(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    _, _, body = await fetch(client, f"/api/{name}/h")
    status, headers, head_body = await fetch(client, f"/api/{name}/h", "HEAD")
    assert (status, head_body, headers["X-Cache"]) == (200, b"", "HIT")
    assert headers["Content-Length"] == str(len(body))
    assert hits.total("HEAD") == 0 and hits.total("GET") == 1


async def test_streamed_miss_is_stored_and_replayed(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    url = f"/api/{name}/big?size=300000&chunked=1"
    _, first, body = await fetch(client, url)
    _, second, again = await fetch(client, url)
    assert (first["X-Cache"], second["X-Cache"]) == ("MISS", "HIT")
    assert body == again == b"x" * 300000
    assert hits.hits["GET /big"] == 1


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        pytest.param("cc=no-store", "no-store", id="no-store"),
        pytest.param("cc=private,max-age=60", "private", id="private"),
        pytest.param("cookie=1", "set-cookie", id="set-cookie"),
        pytest.param("vary=*", "vary-star", id="vary star"),
        pytest.param("status=500", "status", id="status not listed"),
        pytest.param("size=2000", "too-large", id="over max_entry"),
        pytest.param("size=2000&chunked=1", None, id="over max_entry mid-stream"),
    ],
)
async def test_never_stored(gateway: Gateway, name: str, hits: CacheBackend, query: str, detail: str | None) -> None:
    client = await gateway("{ttl: 30s, max_entry: 1000}")
    for _ in range(2):
        _, headers, _ = await fetch(client, f"/api/{name}/n?{query}")
        assert headers["X-Cache"] == "MISS"
        if detail is not None:
            assert headers["Cache-Status"] == f"gateway; fwd=miss; detail={detail}"
    assert hits.hits["GET /n"] == 2


async def test_set_cookie_is_passed_on_a_miss(gateway: Gateway, name: str) -> None:
    client = await gateway()
    async with client.get(f"/api/{name}/c?cookie=1") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize(
    ("query", "ttl"),
    [
        pytest.param("cc=s-maxage=50,max-age=10", 50, id="s-maxage first"),
        pytest.param("cc=max-age=10", 10, id="then max-age"),
        pytest.param("cc=public", 30, id="then the configured ttl"),
    ],
)
async def test_freshness(gateway: Gateway, name: str, query: str, ttl: int) -> None:
    client = await gateway()
    await fetch(client, f"/api/{name}/f?{query}")
    _, headers, _ = await fetch(client, f"/api/{name}/f?{query}")
    assert headers["Cache-Status"] in (f"gateway; hit; ttl={ttl}", f"gateway; hit; ttl={ttl - 1}")


async def test_request_no_cache_revalidates_and_stores(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    await fetch(client, f"/api/{name}/r")
    _, headers, body = await fetch(client, f"/api/{name}/r", headers={"Cache-Control": "no-cache"})
    assert (headers["X-Cache"], headers["Cache-Status"]) == ("MISS", "gateway; fwd=request; stored")
    _, headers, again = await fetch(client, f"/api/{name}/r")
    assert headers["X-Cache"] == "HIT"
    assert body == again and body.startswith(b"/r#2")


async def test_request_no_store_bypasses(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    _, headers, _ = await fetch(client, f"/api/{name}/b", headers={"Cache-Control": "no-store"})
    assert (headers["X-Cache"], headers["Cache-Status"]) == ("BYPASS", "gateway; fwd=bypass; detail=no-store")
    _, headers, _ = await fetch(client, f"/api/{name}/b")
    assert headers["X-Cache"] == "MISS"


async def test_vary_headers_are_in_the_key(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    url = f"/api/{name}/v?vary=X-Variant"
    results = [await fetch(client, url, headers={"X-Variant": v}) for v in ("a", "b", "a", "b")]
    assert [h["X-Cache"] for _, h, _ in results] == ["MISS", "MISS", "HIT", "HIT"]
    assert [b.rpartition(b"=")[2] for _, _, b in results] == [b"a", b"b", b"a", b"b"]
    assert hits.hits["GET /v"] == 2


async def test_concurrent_misses_get_their_own_variant(gateway: Gateway, name: str) -> None:
    client = await gateway()
    url = f"/api/{name}/cv?vary=X-Variant&delay=0.2"
    variants = ["a", "b"] * 10
    results = await asyncio.gather(*(fetch(client, url, headers={"X-Variant": v}) for v in variants))
    assert [body.rpartition(b"=")[2].decode() for _, _, body in results] == variants


async def test_unkeyed_headers_cannot_poison_others(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()
    url = f"/api/{name}/p"
    _, _, forged = await fetch(client, url, headers={"X-Forwarded-Host": "evil.example", "X-Random": "evil"})
    assert b"evil" not in forged  # an untrusted client's X-Forwarded-* never reach the upstream
    _, _, own = await fetch(client, url, headers={"Host": "evil.example"})
    assert b"host=evil.example" in own  # reflected, but only into the key of that Host
    _, headers, victim = await fetch(client, url)
    assert b"evil" not in victim
    _, headers, again = await fetch(client, url, headers={"X-Random": "other"})
    assert (headers["X-Cache"], again) == ("HIT", victim)


async def test_subjects_are_isolated(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway(auth="optional")
    url = f"/api/{name}/me"
    who = [token("alice"), token("bob"), {}]
    first = [await fetch(client, url, headers=h) for h in who]
    second = [await fetch(client, url, headers=h) for h in (token("alice"), token("bob"), {})]
    assert [h["X-Cache"] for _, h, _ in first] == ["MISS"] * 3
    assert [h["X-Cache"] for _, h, _ in second] == ["HIT"] * 3
    assert [b.rpartition(b" ")[2] for _, _, b in second] == [b"sub=alice", b"sub=bob", b"sub=None"]
    assert hits.hits["GET /me"] == 3


async def test_shared_gives_every_subject_one_entry(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway("{ttl: 30s, shared: true}", auth="optional")
    results = [await fetch(client, f"/api/{name}/s", headers=h) for h in (token("alice"), token("bob"), {})]
    assert [h["X-Cache"] for _, h, _ in results] == ["MISS", "HIT", "HIT"]


async def test_unverified_authorization_is_not_cached(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway()  # auth: none: nobody checks the token
    await fetch(client, f"/api/{name}/u")
    _, headers, _ = await fetch(client, f"/api/{name}/u", headers={"Authorization": "Bearer whatever"})
    assert (headers["X-Cache"], headers["Cache-Status"]) == ("BYPASS", "gateway; fwd=bypass; detail=authorization")
    _, headers, _ = await fetch(client, f"/api/{name}/u2", headers={"Authorization": "Bearer whatever"})
    _, headers, _ = await fetch(client, f"/api/{name}/u2")
    assert headers["X-Cache"] == "MISS"  # the first answer was not stored either
    assert hits.hits["GET /u"] == 2


async def test_unverified_authorization_with_shared(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway("{ttl: 30s, shared: true}")
    await fetch(client, f"/api/{name}/u")
    _, headers, _ = await fetch(client, f"/api/{name}/u", headers={"Authorization": "Bearer whatever"})
    assert headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_successful_write_invalidates_the_path(
    gateway: Gateway, name: str, hits: CacheBackend, method: str
) -> None:
    client = await gateway()
    for url in (f"/api/{name}/w", f"/api/{name}/w?page=2", f"/api/{name}/other"):
        await fetch(client, url)
    _, headers, _ = await fetch(client, f"/api/{name}/w", method)
    assert headers["X-Cache"] == "BYPASS"
    results = [await fetch(client, url) for url in (f"/api/{name}/w", f"/api/{name}/w?page=2", f"/api/{name}/other")]
    assert [h["X-Cache"] for _, h, _ in results] == ["MISS", "MISS", "HIT"]


async def test_failed_write_does_not_invalidate(gateway: Gateway, name: str) -> None:
    client = await gateway()
    await fetch(client, f"/api/{name}/w")
    status, _, _ = await fetch(client, f"/api/{name}/w?status=409", "POST")
    assert status == 409
    _, headers, _ = await fetch(client, f"/api/{name}/w")
    assert headers["X-Cache"] == "HIT"


async def test_fifty_concurrent_misses_make_one_upstream_request(
    gateway: Gateway, name: str, hits: CacheBackend
) -> None:
    client = await gateway()
    results = await asyncio.gather(*(fetch(client, f"/api/{name}/slow?delay=0.3") for _ in range(50)))
    assert hits.hits["GET /slow"] == 1
    assert {body for _, _, body in results} == {results[0][2]}
    assert sorted(h["X-Cache"] for _, h, _ in results) == ["HIT"] * 49 + ["MISS"]


async def test_stale_while_revalidate(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway("{ttl: 30s, stale_while_revalidate: 30s}")
    url = f"/api/{name}/swr?cc=max-age=1"
    _, _, first = await fetch(client, url)
    await asyncio.sleep(1.1)
    _, headers, stale = await fetch(client, url)
    assert headers["X-Cache"] == "STALE" and stale == first
    assert headers["Cache-Status"].startswith("gateway; hit; ttl=-")
    for _ in range(100):  # the refresh runs in the background
        if hits.hits["GET /swr"] == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    _, headers, fresh = await fetch(client, url)
    assert (headers["X-Cache"], fresh.split(b" ")[0]) == ("HIT", b"/swr#2")
    assert hits.hits["GET /swr"] == 2


async def test_a_stale_head_refreshes_the_get_entry(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway("{ttl: 30s, stale_while_revalidate: 30s}")
    url = f"/api/{name}/sh?cc=max-age=1"
    await fetch(client, url)
    await asyncio.sleep(1.1)
    _, headers, _ = await fetch(client, url, "HEAD")
    assert headers["X-Cache"] == "STALE"
    for _ in range(100):
        if hits.hits["GET /sh"] == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    _, headers, body = await fetch(client, url)
    assert (headers["X-Cache"], body.split(b" ")[0]) == ("HIT", b"/sh#2")


async def test_stale_if_error_on_5xx_and_when_the_backend_is_gone(
    gateway: Gateway, name: str, hits: CacheBackend, cache_server: TestServer
) -> None:
    client = await gateway("{ttl: 30s, stale_if_error: 30s}")
    url = f"/api/{name}/sie?cc=max-age=1&age=2"  # stale as soon as it is stored
    _, _, first = await fetch(client, url)
    hits.down = True
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Cache"], body) == (200, "STALE", first)
    assert headers["Cache-Status"].startswith("gateway; fwd=stale; fwd-status=503; ttl=-")
    await cache_server.close()
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Cache"], body) == (200, "STALE", first)
    assert "fwd-status=502" in headers["Cache-Status"]


async def test_a_stale_entry_the_upstream_answers_for_again_is_a_miss_that_says_stale(
    gateway: Gateway, name: str, hits: CacheBackend
) -> None:
    client = await gateway("{ttl: 30s, stale_if_error: 30s}")
    url = f"/api/{name}/sa?cc=max-age=1&age=2"  # stale as soon as it is stored
    await fetch(client, url)
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Cache"], body.split(b" ")[0]) == (200, "MISS", b"/sa#2")
    assert headers["Cache-Status"] == "gateway; fwd=stale; stored"


async def test_without_stale_if_error_the_error_passes(gateway: Gateway, name: str, hits: CacheBackend) -> None:
    client = await gateway("{ttl: 30s, stale_while_revalidate: 0s}")
    url = f"/api/{name}/e?cc=max-age=1&age=2"
    await fetch(client, url)
    hits.down = True
    status, headers, _ = await fetch(client, url)
    assert (status, headers["X-Cache"]) == (503, "MISS")


async def test_store_down_bypasses(make_gateway: MakeGateway, cache_server: TestServer, name: str) -> None:
    client = await make_gateway(
        YAML,
        store="redis://127.0.0.1:1/0",  # refused: nothing listens on port 1
        name=name,
        upstream=upstream(cache_server),
        auth="none",
        cache="{ttl: 30s}",
    )
    for _ in range(2):
        status, headers, _ = await fetch(client, f"/api/{name}/d")
        assert (status, headers["Cache-Status"]) == (200, "gateway; fwd=bypass; detail=store-unavailable")


async def test_uncached_route_has_no_cache_headers(make_gateway: MakeGateway, cache_server: TestServer) -> None:
    client = await make_gateway(
        YAML, store="memory://", name="plain", upstream=upstream(cache_server), auth="none", cache="off"
    )
    _, headers, _ = await fetch(client, "/api/plain/x")
    assert "X-Cache" not in headers


async def test_memory_store_bounds_the_cache_in_bytes(
    make_gateway: MakeGateway, cache_server: TestServer, name: str
) -> None:
    text = YAML.replace('store: {{url: "{store}", timeout: 2s}}', "store: {{url: memory://, max_memory: 64KiB}}")
    client = await make_gateway(text, name=name, upstream=upstream(cache_server), auth="none", cache="{ttl: 30s}")
    urls = [f"/api/{name}/m{i}?size=10000" for i in range(20)]
    for url in urls:
        await fetch(client, url)
    store = client.app[STORE]
    assert isinstance(store, MemoryStore)
    assert store.used_bytes <= 64 * 1024
    results = [(await fetch(client, url))[1]["X-Cache"] for url in (urls[-1], urls[0])]
    assert results == ["HIT", "MISS"]  # the least recently used went first
