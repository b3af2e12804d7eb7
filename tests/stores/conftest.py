"""The ``store`` fixture: every contract test runs on memory, one Redis and a Redis Cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import StoreConfig
from gateway.stores import MemoryStore, open_store
from middleware.base import Store

Advance = Callable[[float], Awaitable[None]]

KINDS = ["memory", "redis", "cluster"]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unique_namespace() -> str:
    return f"t-{uuid.uuid4().hex[:8]}:"  # isolation without FLUSHALL


def store_url(request: pytest.FixtureRequest, kind: str) -> str:
    fixture = {"redis": "redis_url", "cluster": "redis_cluster"}[kind]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(params=KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(request: pytest.FixtureRequest, store_kind: str, clock: FakeClock) -> AsyncIterator[Store]:
    if store_kind == "memory":
        store: Store = MemoryStore(1024 * 1024, clock=clock)
    else:
        # a generous timeout: these tests are about answers; the timeout tests use the default
        config = StoreConfig(url=store_url(request, store_kind), timeout=2.0)
        store = open_store(config, namespace=unique_namespace())
        await store.ping()  # as the gateway does on startup
    yield store
    await store.aclose()


@pytest.fixture
def advance(store_kind: str, clock: FakeClock) -> Advance:
    """Let ``seconds`` pass for the store: the memory store's clock moves, Redis' time really passes."""

    async def advance(seconds: float) -> None:
        if store_kind == "memory":
            clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    return advance


@pytest.fixture
def tolerance(store_kind: str) -> float:
    """How far a duration from the store may be from the arithmetic: exact in memory; on Redis,
    the time the calls themselves took passes on the server's clock."""
    return 1e-9 if store_kind == "memory" else 0.05
