"""The cache middleware on its own: config, time (an injected clock), coalescing across
instances, purging, a dead store (DESIGN §6, §9). The endpoint here honours the BodyTap
contract as the proxy does; tests/gateway/test_gateway_cache.py runs the real proxy.

Behaviour tests run on the memory store, a real Redis and a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.config import StoreConfig
from gateway.stores import MemoryStore, open_store
from middleware._cache_key import Entry, Keys
from middleware.base import BODY_TAP, OUTCOME, AddToSet, Change, Handler, Put, Remove, Store
from middleware.cache import CacheConfig, CacheMiddleware, purge
from middleware.schema import ConfigError, Section
from tests.stores.conftest import FakeClock

from .conftest import MakeClient

Client = TestClient[web.Request, web.Application]
HOST = {"Host": "api.test"}  # Host is in the key: every client of these tests uses the same one


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param({}, CacheConfig(), id="defaults"),
        pytest.param(
            {"ttl": "5m", "max_entry": "2KiB", "shared": True, "stale_while_revalidate": "10s", "stale_if_error": 60},
            CacheConfig(ttl=300, max_entry=2048, shared=True, stale_while_revalidate=10, stale_if_error=60),
            id="everything",
        ),
        pytest.param({"statuses": [200]}, CacheConfig(statuses=frozenset({200})), id="statuses"),
    ],
)
def test_config(raw: dict[str, object], expected: CacheConfig) -> None:
    assert CacheConfig.parse(Section.single("cache", raw)) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param({"statuses": [200, 999]}, "cache.statuses: expected a list of HTTP status codes", id="bad status"),
        pytest.param({"tll": "5s"}, "cache.tll: unknown key", id="typo"),
        pytest.param({"shared": "yes please"}, "cache.shared", id="not a boolean"),
    ],
)
def test_config_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CacheConfig.parse(Section.single("cache", raw))


def test_off_means_no_cache() -> None:
    assert CacheConfig.parse(Section.single("cache", "off")) is None


# -- behaviour -------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    if request.param == "memory":
        store: Store = MemoryStore(1024 * 1024, clock=clock)
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster")
        store = open_store(StoreConfig(url=url, timeout=0.5), namespace=f"t-{uuid.uuid4().hex[:8]}:")
    yield store
    await store.aclose()


class Upstream:
    """An endpoint that feeds the BodyTap as the proxy does, counting its calls by path."""

    def __init__(self, headers: Sequence[tuple[str, str]] = (), delay: float = 0.0) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.headers = list(headers)
        self.delay = delay
        self.gate: asyncio.Event | None = None  # when set: calls after the first wait for it

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        await asyncio.sleep(self.delay)
        if self.gate is not None and self.hits[request.path] > 1:
            await asyncio.wait_for(self.gate.wait(), timeout=10)
        body = f"{request.path}#{self.hits[request.path]}".encode()
        tag = request.query.get("tag")
        headers = [*self.headers, *([("Cache-Tag", tag)] if tag else [])]
        tap = request.get(BODY_TAP)
        if tap is not None:
            tap.start(200, "OK", headers)
            tap.feed(body)
            tap.finish(True)
        return web.Response(body=body, headers=CIMultiDict(headers) if headers else None)


def cache(store: Store, clock: FakeClock, scope: str = "svc", **config: object) -> CacheMiddleware:
    return CacheMiddleware(CacheConfig(**config), store=store, scope=scope, clock=clock)  # type: ignore[arg-type]


async def get(client: Client, path: str) -> tuple[str, str]:
    async with client.get(path, headers=HOST) as response:
        return response.headers["X-Cache"], await response.text()


async def test_fresh_for_the_ttl_then_a_miss(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    upstream = Upstream()
    client = await make_client(cache(store, clock, ttl=10), handler=upstream.handle)
    assert await get(client, "/a") == ("MISS", "/a#1")
    clock.advance(9.5)
    async with client.get("/a", headers=HOST) as response:
        assert (response.headers["X-Cache"], response.headers["Age"]) == ("HIT", "9")
        assert response.headers["Cache-Status"] == "gateway; hit; ttl=0"
    clock.advance(1)
    assert await get(client, "/a") == ("MISS", "/a#2")


async def test_upstream_age_counts(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    client = await make_client(cache(store, clock, ttl=10), handler=Upstream([("Age", "4")]).handle)
    await get(client, "/a")
    async with client.get("/a", headers=HOST) as response:
        assert (response.headers["Age"], response.headers["Cache-Status"]) == ("4", "gateway; hit; ttl=6")


async def test_stale_while_revalidate_refreshes_once(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    upstream = Upstream()
    upstream.gate = asyncio.Event()  # the refresh stays under way while the stale entry is served
    middleware = cache(store, clock, ttl=10, stale_while_revalidate=30)
    client = await make_client(middleware, handler=upstream.handle)
    await get(client, "/a")
    clock.advance(15)
    assert await asyncio.gather(*(get(client, "/a") for _ in range(5))) == [("STALE", "/a#1")] * 5
    upstream.gate.set()
    await middleware.drain()
    assert upstream.hits["/a"] == 2
    assert await get(client, "/a") == ("HIT", "/a#2")
    clock.advance(50)  # beyond the stale window: a plain miss
    assert await get(client, "/a") == ("MISS", "/a#3")


async def test_outcome_records_the_decision(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    seen: list[str | None] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        seen.append(request[OUTCOME].cache)
        return response

    client = await make_client(record, cache(store, clock), handler=Upstream().handle)
    await get(client, "/a")
    await get(client, "/a")
    await client.post("/a")
    assert seen == ["MISS", "HIT", "BYPASS"]


async def test_two_instances_on_one_store_fill_once(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    upstream = Upstream(delay=0.3)
    # two middlewares, each with its own in-process state, as two gateway instances
    one = await make_client(cache(store, clock), handler=upstream.handle)
    two = await make_client(cache(store, clock), handler=upstream.handle)
    results = await asyncio.gather(*(get(client, "/a") for _ in range(10) for client in (one, two)))
    assert upstream.hits["/a"] == 1, results
    assert {body for _, body in results} == {"/a#1"}
    assert sorted(result for result, _ in results) == ["HIT"] * 19 + ["MISS"]


class _Watched:
    """The test's store, with a record of the calls made through it and of the fill locks they
    took (``("lock", key)``); ``before_lock`` runs just before each ``add_and_get``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[tuple[str, object]] = []
        self.before_lock: Callable[[], Awaitable[object]] | None = None
        self.after_read: Awaitable[object] | None = None  # awaited once, after the next get_many has read
        self.after_lock_taken: Awaitable[object] | None = None  # awaited once, after a lookup takes a lock

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def add_and_get(self, key: str, value: bytes, *, ttl: float, then: str) -> tuple[bool, bytes | None]:
        if self.before_lock is not None:
            await self.before_lock()
        self.calls.append(("lock", key))
        return await self.store.add_and_get(key, value, ttl=ttl, then=then)

    async def get_many_or_add(self, *keys: str, add: str, value: bytes, ttl: float) -> tuple[list[bytes | None], bool]:
        self.calls.append(("get_many_or_add", keys))
        values, added = await self.store.get_many_or_add(*keys, add=add, value=value, ttl=ttl)
        if added:
            self.calls.append(("lock", add))
            if self.after_lock_taken is not None:
                after, self.after_lock_taken = self.after_lock_taken, None
                await after
        return values, added

    async def write(self, *changes: Change) -> None:
        self.calls.append(("write", changes))
        await self.store.write(*changes)

    async def delete(self, *keys: str) -> int:
        self.calls.append(("delete", keys))
        return await self.store.delete(*keys)

    async def get_many(self, *keys: str) -> list[bytes | None]:
        self.calls.append(("get_many", keys))
        values = await self.store.get_many(*keys)
        if self.after_read is not None:
            after, self.after_read = self.after_read, None
            await after
        return values

    async def get(self, key: str) -> bytes | None:
        self.calls.append(("get", key))
        return await self.store.get(key)

    def locking(self) -> list[tuple[str, object]]:
        """The lock, write and delete calls made so far, in order."""
        return [call for call in self.calls if not call[0].startswith("get")]

    def reads(self) -> list[str]:
        """The read calls made so far, by name; forgets them."""
        names = [name for name, _ in self.calls if name.startswith("get")]
        self.calls.clear()
        return names


async def _watched_client(
    make_client: MakeClient, store: Store, clock: FakeClock, upstream: Upstream
) -> tuple[_Watched, Client]:
    """A cached client whose store calls are recorded (``_Watched``)."""
    watched = _Watched(store)
    client = await make_client(cache(watched, clock), handler=upstream.handle)  # type: ignore[arg-type]
    return watched, client


async def test_a_get_miss_takes_its_fill_lock_in_the_lookup_itself(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    watched, client = await _watched_client(make_client, store, clock, Upstream())
    assert (await get(client, "/a"))[0] == "MISS"
    names = [name for name, _ in watched.calls]
    assert names == ["get_many_or_add", "lock", "write"]  # one round trip to look and lock, one to store


async def test_a_head_miss_or_a_no_cache_get_takes_no_fill_lock(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    watched, client = await _watched_client(make_client, store, clock, Upstream())
    assert (await client.head("/a")).headers["X-Cache"] == "MISS"
    response = await client.get("/b", headers={"Cache-Control": "no-cache"})
    assert response.headers["X-Cache"] == "MISS"
    assert [name for name, _ in watched.calls if name != "write"] == ["get_many", "get_many"]


async def test_a_refill_that_ends_just_before_the_lock_is_taken_is_served(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream = Upstream()
    other = await make_client(cache(store, clock, stale_if_error=30), handler=upstream.handle)  # another instance
    watched = _Watched(store)
    client = await make_client(cache(watched, clock, stale_if_error=30), handler=upstream.handle)  # type: ignore[arg-type]
    assert await get(client, "/a") == ("MISS", "/a#1")
    clock.advance(61)  # stale: a lookup finds the entry, so it takes no lock; going upstream takes it
    watched.before_lock = lambda: get(other, "/a")  # it refills /a between this one's lookup and its lock
    assert await get(client, "/a") == ("HIT", "/a#2")  # the look taken with the lock found it
    assert upstream.hits["/a"] == 2


async def test_the_request_whose_lookup_took_the_lock_fills_while_holding_it(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream, locked_out = Upstream(), asyncio.Event()
    watched = _Watched(store)
    held_during_fetch: list[bool] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        lock = next(key for name, key in watched.calls if name == "lock")
        held_during_fetch.append(await store.get(str(lock)) is not None)
        return await upstream.handle(request)

    async def lock_refused() -> None:
        locked_out.set()

    # the lookup that takes the lock returns last: the other request of this process has
    # already missed, found the lock taken and started waiting for it
    watched.after_lock_taken = locked_out.wait()
    watched.before_lock = lock_refused
    client = await make_client(cache(watched, clock), handler=handle)  # type: ignore[arg-type]
    results = await asyncio.gather(get(client, "/a"), get(client, "/a"))
    assert sorted(result for result, _ in results) == ["HIT", "MISS"]
    assert upstream.hits["/a"] == 1
    assert held_during_fetch == [True]  # went upstream holding the lock: no other instance could fill too


async def test_a_poll_does_not_miss_a_fill_that_ends_between_its_reads(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream, upstream_called = Upstream(delay=0.2), asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        upstream_called.set()
        return await upstream.handle(request)

    filler = await make_client(cache(store, clock), handler=handle)  # another instance
    watched = _Watched(store)
    poller = await make_client(cache(watched, clock), handler=upstream.handle)  # type: ignore[arg-type]
    filling = asyncio.create_task(get(filler, "/a"))
    await asyncio.wait_for(upstream_called.wait(), 5)  # the filler holds the lock and is upstream
    # the poller's next look for the entry finds none, and the fill (entry stored, lock released)
    # ends before that look returns: the lock, read after it, would be gone with the entry there
    watched.after_read = filling
    assert await get(poller, "/a") == ("HIT", "/a#1")
    assert await filling == ("MISS", "/a#1")
    assert upstream.hits["/a"] == 1


async def test_a_fill_releases_its_lock_in_the_round_trip_that_stores_the_entry(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    watched, client = await _watched_client(make_client, store, clock, Upstream())
    assert (await get(client, "/a"))[0] == "MISS"
    (_, lock), (what, changes) = watched.locking()
    assert what == "write"
    assert isinstance(changes, tuple) and [type(change) for change in changes] == [Put, AddToSet, Remove]
    assert changes[-1] == Remove((str(lock),))  # after the entry and its index record
    assert await store.get(str(lock)) is None
    assert (await get(client, "/a"))[0] == "HIT"


async def test_a_fill_that_stores_nothing_releases_its_lock(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    watched, client = await _watched_client(make_client, store, clock, Upstream([("Cache-Control", "no-store")]))
    assert (await get(client, "/a"))[0] == "MISS"
    (_, lock), released = watched.locking()
    assert released == ("delete", (lock,))
    assert await store.get(str(lock)) is None


async def test_a_lookup_reads_the_entry_with_its_generations_in_one_round_trip(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    watched, client = await _watched_client(make_client, store, clock, Upstream())
    assert (await get(client, "/a?page=1"))[0] == "MISS"
    watched.calls.clear()
    assert (await get(client, "/a?page=1"))[0] == "HIT"
    assert (await get(client, "/a?page=2"))[0] == "MISS"  # a new query on a known path
    assert watched.reads() == ["get_many_or_add", "get_many_or_add"]  # no second read for the entry key


async def test_an_entry_invalidated_on_another_instance_is_not_served_from_a_guessed_key(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream = Upstream()
    watched, one = await _watched_client(make_client, store, clock, upstream)
    other = await make_client(cache(store, clock), handler=upstream.handle)
    assert await get(one, "/a") == ("MISS", "/a#1")
    async with other.post("/a", headers=HOST) as response:  # bumps /a's generation; the old entry stays stored
        assert response.status == 200
    assert await get(other, "/a") == ("MISS", "/a#3")
    watched.calls.clear()
    assert await get(one, "/a") == ("HIT", "/a#3")  # not /a#1, which the key guessed from before leads to
    assert watched.reads() == ["get_many_or_add", "get"]  # the guess was wrong: one more read
    assert await get(one, "/a") == ("HIT", "/a#3")
    assert watched.reads() == ["get_many_or_add"]  # and right again once seen


async def test_a_fill_lock_taken_on_a_wrongly_guessed_key_is_released(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream = Upstream()
    watched, client = await _watched_client(make_client, store, clock, upstream)
    assert await get(client, "/a") == ("MISS", "/a#1")
    assert await purge(store, service="svc") == 1  # as another instance's admin does: a new generation
    watched.calls.clear()
    assert await get(client, "/a") == ("MISS", "/a#2")
    # the guessed key (the old generation's) had no entry, so the lookup locked it: released at once
    (_, guessed), (_, released), (_, taken) = [call for call in watched.locking() if call[0] != "write"]
    assert released == (guessed,) and taken != guessed
    assert await store.get_many(str(guessed), str(taken)) == [None, None]


async def test_an_uncacheable_answer_is_not_shared_with_waiters(
    make_client: MakeClient, store: Store, clock: FakeClock
) -> None:
    upstream = Upstream([("Cache-Control", "private")], delay=0.1)
    client = await make_client(cache(store, clock), handler=upstream.handle)
    results = await asyncio.gather(*(get(client, "/a") for _ in range(5)))
    assert [result for result, _ in results] == ["MISS"] * 5
    assert upstream.hits["/a"] == 5


# -- purge -----------------------------------------------------------------------------


async def _fill(client: Client, paths: Sequence[str]) -> None:
    for path in paths:
        assert (await get(client, path))[0] == "MISS"
        assert (await get(client, path))[0] == "HIT"


async def _results(client: Client, paths: Sequence[str]) -> list[str]:
    return [(await get(client, path))[0] for path in paths]


async def test_purge_a_service(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    users = await make_client(cache(store, clock, scope="users"), handler=Upstream().handle)
    chat = await make_client(cache(store, clock, scope="chat"), handler=Upstream().handle)
    await _fill(users, ["/a", "/b?x=1"])
    await _fill(chat, ["/a"])
    assert await purge(store, service="users") == 2
    assert await _results(users, ["/a", "/b?x=1"]) == ["MISS", "MISS"]
    assert await _results(chat, ["/a"]) == ["HIT"]
    assert await purge(store, service="nobody") == 0


async def test_purge_a_path_prefix(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    client = await make_client(cache(store, clock, scope="users"), handler=Upstream().handle)
    paths = ["/users", "/users/1", "/users/1?full=1", "/users2", "/teams/1"]
    await _fill(client, paths)
    assert await purge(store, service="users", prefix="/users") == 3
    assert await _results(client, paths) == ["MISS", "MISS", "MISS", "HIT", "HIT"]
    assert await purge(store, service="users", prefix="/") == 5


async def test_purge_a_tag(make_client: MakeClient, store: Store, clock: FakeClock) -> None:
    client = await make_client(cache(store, clock, scope="users"), handler=Upstream().handle)
    paths = ["/a?tag=user-1,list", "/b?tag=user-1", "/c?tag=list user-2", "/d"]
    await _fill(client, paths)
    assert await purge(store, service="users", tag="user-1") == 2
    assert await _results(client, paths) == ["MISS", "MISS", "HIT", "HIT"]
    assert await purge(store, service="users", tag="list") == 2  # /a again (refilled), and /c
    assert await purge(store, service="users", tag="list") == 0


async def test_purge_takes_one_selector(store: Store) -> None:
    with pytest.raises(ValueError, match="not both"):
        await purge(store, service="users", prefix="/a", tag="t")


# -- a dead store ----------------------------------------------------------------------


async def test_store_down_bypasses_and_never_fails(make_client: MakeClient, clock: FakeClock) -> None:
    dead = open_store(StoreConfig(url="redis://127.0.0.1:1/0", timeout=0.05), namespace="t:")
    try:
        upstream = Upstream()
        client = await make_client(cache(dead, clock), handler=upstream.handle)
        for _ in range(2):
            async with client.get("/a", headers=HOST) as response:
                assert response.status == 200
                assert response.headers["Cache-Status"] == "gateway; fwd=bypass; detail=store-unavailable"
        async with client.post("/a") as response:  # the invalidation fails quietly
            assert response.status == 200
        assert upstream.hits["/a"] == 3
    finally:
        await dead.aclose()


# -- header bytes that are not UTF-8 (lone surrogates from surrogateescape) ----------------------


def test_an_entry_with_a_field_that_is_not_utf8_decodes_to_what_was_encoded() -> None:
    entry = Entry(
        status=200, reason="OK", headers=[("X-Odd", "caf\udce9")], body=b"ok", stored=1.0, age=0.0, fresh=30, stale=0
    )
    assert Entry.decode(entry.encode()) == entry


def test_keyed_values_that_differ_only_in_a_byte_that_is_not_utf8_have_different_digests() -> None:
    digest = functools.partial(Keys.digest, [b"1", None], "/a", None)
    assert digest(["http", "host:gw\udcff"]) != digest(["http", "host:gw\udcfe"]) != digest(["http", "host:gw"])
