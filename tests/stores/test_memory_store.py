"""What only the memory store has: its byte bound, LRU eviction, and an exact, injected clock."""

from __future__ import annotations

import pytest

from gateway.stores.memory import ENTRY_OVERHEAD, SET_MEMBER_OVERHEAD, MemoryStore
from tests.stores.conftest import FakeClock

VALUE = b"0123456789"
SIZE = len("k1") + len(VALUE) + ENTRY_OVERHEAD  # every key below has two characters


async def test_least_recently_used_is_evicted() -> None:
    store = MemoryStore(3 * SIZE)
    for key in ("k1", "k2", "k3"):
        await store.set(key, VALUE, ttl=60)
    assert await store.get("k1") == VALUE  # a read is a use: k2 is now the oldest
    await store.set("k4", VALUE, ttl=60)
    assert [await store.get(key) for key in ("k1", "k2", "k3", "k4")] == [VALUE, None, VALUE, VALUE]
    assert (len(store), store.used_bytes) == (3, 3 * SIZE)


async def test_overwrite_is_counted_once() -> None:
    store = MemoryStore(3 * SIZE)
    for _ in range(5):
        await store.set("k1", VALUE, ttl=60)
    await store.set("k1", b"", ttl=60)
    assert (len(store), store.used_bytes) == (1, SIZE - len(VALUE))


async def test_value_larger_than_the_bound_is_not_stored() -> None:
    store = MemoryStore(SIZE)
    await store.set("k1", VALUE, ttl=60)
    await store.set("k1", VALUE * 2, ttl=60)  # the old value goes too: never serve a stale one
    assert await store.get("k1") is None
    assert store.used_bytes == 0


async def test_rate_limit_state_is_bounded_too() -> None:
    store = MemoryStore(10 * 1024)
    for n in range(1000):
        await store.take(f"client-{n}", limit=5, period=60)
    assert store.used_bytes <= 10 * 1024
    assert 0 < len(store) < 1000
    assert (await store.take("client-999", limit=5, period=60)).remaining == 3  # recent: kept


async def test_expired_entries_free_their_bytes() -> None:
    clock = FakeClock()
    store = MemoryStore(3 * SIZE, clock=clock)
    await store.set("k1", VALUE, ttl=1)
    clock.advance(0.999999)
    assert await store.get("k1") == VALUE
    clock.advance(0.000001)
    assert await store.get("k1") is None
    assert store.used_bytes == 0


async def test_retry_after_is_exact() -> None:
    clock = FakeClock(12345.678)
    store = MemoryStore(clock=clock)
    await store.take("rl", limit=3, period=1)  # T = 333333µs: a period that does not divide evenly
    for _ in range(3):
        rejected = await store.take("rl", limit=3, period=1)
    assert not rejected.allowed
    assert rejected.retry_after == 0.333333
    clock.advance(rejected.retry_after - 0.000001)
    assert not (await store.take("rl", limit=3, period=1)).allowed
    clock.advance(0.000001)
    assert (await store.take("rl", limit=3, period=1)).allowed


async def test_aclose_empties() -> None:
    store = MemoryStore()
    await store.set("k1", VALUE, ttl=60)
    await store.aclose()
    assert (len(store), store.used_bytes) == (0, 0)


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(0)


async def test_sets_count_against_the_bound() -> None:
    store = MemoryStore(2000)
    await store.sadd("index", *(f"member-{i:03d}" for i in range(10)), ttl=60)
    used = store.used_bytes
    assert used == len("index") + ENTRY_OVERHEAD + 10 * (10 + SET_MEMBER_OVERHEAD)
    await store.sadd("index", "member-000", ttl=60)  # already there: nothing more
    assert store.used_bytes == used
    await store.sadd("index", *(f"member-{i:03d}" for i in range(10, 40)), ttl=60)  # over the bound
    assert await store.smembers("index") == frozenset()
    assert store.used_bytes == 0
