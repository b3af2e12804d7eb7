"""The Store contract (DESIGN §6, §9): one suite, run on memory, one Redis and a Redis Cluster."""

from __future__ import annotations

import asyncio

import pytest

from middleware.base import AddToSet, Put, Remove, Store
from tests.stores.conftest import Advance

# -- key/value --------------------------------------------------------------------------


async def test_get_set_overwrite(store: Store) -> None:
    assert await store.get("k") is None
    await store.set("k", b"one", ttl=60)
    assert await store.get("k") == b"one"
    await store.set("k", b"\x00two\xff", ttl=60)
    assert await store.get("k") == b"\x00two\xff"


async def test_ttl_expiry(store: Store, advance: Advance) -> None:
    await store.set("short", b"v", ttl=0.1)
    await store.set("long", b"v", ttl=60)
    assert await store.get("short") == b"v"
    await advance(0.15)
    assert await store.get("short") is None
    assert await store.get("long") == b"v"


async def test_zero_ttl_deletes(store: Store) -> None:
    await store.set("k", b"v", ttl=60)
    await store.set("k", b"w", ttl=0)
    assert await store.get("k") is None


async def test_delete(store: Store) -> None:
    keys = [f"k{i}" for i in range(10)]  # on a Cluster, these live in different slots
    for key in keys:
        await store.set(key, b"v", ttl=60)
    await store.delete(*keys[:9], "missing")
    await store.delete()
    assert [await store.get(key) for key in keys] == [None] * 9 + [b"v"]


async def test_delete_counts_what_existed(store: Store) -> None:
    await store.set("c:{s}:a", b"1", ttl=60)
    await store.set("c:{s}:b", b"1", ttl=60)
    assert await store.delete("c:{s}:a", "c:{s}:b", "c:{s}:missing") == 2
    assert await store.delete() == 0


async def test_add_only_when_absent(store: Store, advance: Advance) -> None:
    assert await store.add("lock", b"me", ttl=0.1)
    assert not await store.add("lock", b"you", ttl=0.1)
    assert await store.get("lock") == b"me"
    await advance(0.15)
    assert await store.add("lock", b"you", ttl=60)
    assert await store.get("lock") == b"you"


async def test_concurrent_add_has_one_winner(store: Store) -> None:
    won = await asyncio.gather(*(store.add("lock", b"%d" % i, ttl=60) for i in range(20)))
    assert sum(won) == 1


async def test_add_and_get_takes_a_lock_and_reads_in_that_order(store: Store) -> None:
    assert await store.add_and_get("c:{s}:lock", b"me", ttl=60, then="c:{s}:entry") == (True, None)
    await store.set("c:{s}:entry", b"filled", ttl=60)
    assert await store.add_and_get("c:{s}:lock", b"you", ttl=60, then="c:{s}:entry") == (False, b"filled")
    assert await store.add_and_get("c:{s}:new", b"me", ttl=60, then="c:{s}:new") == (True, b"me")  # the add came first
    assert await store.get("c:{s}:lock") == b"me"


async def test_concurrent_add_and_get_has_one_winner(store: Store) -> None:
    taken = await asyncio.gather(
        *(store.add_and_get("c:{s}:lock", b"%d" % i, ttl=60, then="c:{s}:e") for i in range(20))
    )
    assert sum(locked for locked, _ in taken) == 1


async def test_get_many_or_add_takes_the_lock_when_the_last_key_is_absent(store: Store) -> None:
    await store.set("c:{s}:gen", b"3", ttl=60)
    read = await store.get_many_or_add("c:{s}:gen", "c:{s}:entry", add="c:{s}:lock", value=b"me", ttl=60)
    assert read == ([b"3", None], True)
    assert await store.get("c:{s}:lock") == b"me"


async def test_get_many_or_add_leaves_the_lock_when_the_last_key_is_there(store: Store) -> None:
    await store.set("c:{s}:entry", b"filled", ttl=60)
    read = await store.get_many_or_add("c:{s}:gen", "c:{s}:entry", add="c:{s}:lock", value=b"me", ttl=60)
    assert read == ([None, b"filled"], False)
    assert await store.get("c:{s}:lock") is None


async def test_get_many_or_add_does_not_take_a_lock_someone_holds(store: Store) -> None:
    await store.set("c:{s}:lock", b"you", ttl=60)
    read = await store.get_many_or_add("c:{s}:entry", add="c:{s}:lock", value=b"me", ttl=60)
    assert read == ([None], False)
    assert await store.get("c:{s}:lock") == b"you"


async def test_get_many_or_add_lock_expires_after_its_ttl(store: Store, advance: Advance) -> None:
    assert (await store.get_many_or_add("c:{s}:entry", add="c:{s}:lock", value=b"me", ttl=0.1))[1]
    await advance(0.15)
    assert await store.get("c:{s}:lock") is None
    assert (await store.get_many_or_add("c:{s}:entry", add="c:{s}:lock", value=b"again", ttl=60))[1]


async def test_concurrent_get_many_or_add_has_one_winner(store: Store) -> None:
    taken = await asyncio.gather(
        *(store.get_many_or_add("c:{s}:e", add="c:{s}:lock", value=b"%d" % i, ttl=60) for i in range(20))
    )
    assert sum(added for _, added in taken) == 1


async def test_write_applies_its_changes_in_order(store: Store, advance: Advance) -> None:
    await store.set("c:{s}:lock", b"1", ttl=60)
    await store.set("c:{s}:gone", b"1", ttl=60)
    await store.write(
        Put("c:{s}:entry", b"body", 60),
        Put("c:{s}:short", b"soon gone", 0.1),
        AddToSet("c:{s}:index", ("a /x", "b /y"), 60),
        AddToSet("c:{s}:empty", (), 60),  # nothing to add: no set
        Put("c:{s}:gone", b"ignored", 0),  # a ttl of zero deletes, as set() does
        Put("c:{s}:twice", b"first", 60),
        Put("c:{s}:twice", b"second", 60),
        Remove(("c:{s}:lock", "c:{s}:missing")),
    )
    assert await store.get_many("c:{s}:entry", "c:{s}:short", "c:{s}:gone", "c:{s}:twice", "c:{s}:lock") == [
        b"body",
        b"soon gone",
        None,
        b"second",
        None,
    ]
    assert await store.smembers("c:{s}:index") == {"a /x", "b /y"}
    assert await store.smembers("c:{s}:empty") == frozenset()
    await advance(0.15)
    assert await store.get("c:{s}:short") is None
    await store.write()  # no change: nothing sent


async def test_write_adds_many_members_at_once(store: Store) -> None:
    members = tuple(f"{n} /path/{n}" for n in range(10_000))  # more than one Lua unpack takes (about 8,000)
    await store.write(AddToSet("c:{s}:index", members, 60), Put("c:{s}:after", b"1", 60))
    assert await store.smembers("c:{s}:index") == frozenset(members)
    assert await store.get("c:{s}:after") == b"1"


async def test_get_many(store: Store) -> None:
    await store.set("c:{s}:a", b"1", ttl=60)
    await store.set("c:{s}:c", b"\x003", ttl=60)
    assert await store.get_many("c:{s}:a", "c:{s}:b", "c:{s}:c") == [b"1", None, b"\x003"]
    assert await store.get_many("x", "y") == [None, None]  # different slots on a Cluster
    assert await store.get_many() == []


async def test_sets(store: Store, advance: Advance) -> None:
    assert await store.smembers("c:{s}:t") == frozenset()
    await store.sadd("c:{s}:t", "a", "b", ttl=60)
    await store.sadd("c:{s}:t", "b", "c d", ttl=0.1)  # the ttl is renewed by every add
    assert await store.smembers("c:{s}:t") == {"a", "b", "c d"}
    await advance(0.15)
    assert await store.smembers("c:{s}:t") == frozenset()
    await store.sadd("c:{s}:t", "x", ttl=60)
    assert await store.delete("c:{s}:t") == 1
    assert await store.smembers("c:{s}:t") == frozenset()


async def test_incr(store: Store) -> None:
    assert [await store.incr("gen") for _ in range(3)] == [1, 2, 3]
    assert await store.get("gen") == b"3"
    await store.delete("gen")
    assert await store.incr("gen") == 1


async def test_incr_keeps_ttl(store: Store, advance: Advance) -> None:
    await store.set("gen", b"41", ttl=0.1)
    assert await store.incr("gen") == 42
    await advance(0.15)
    assert await store.get("gen") is None


async def test_keys_are_namespaced(store: Store) -> None:
    await store.set("a", b"1", ttl=60)
    await store.set("{a}", b"2", ttl=60)  # a key with its own hash tag is a different key
    assert await store.get("a") == b"1"
    assert await store.get("{a}") == b"2"


async def test_ping(store: Store) -> None:
    await store.ping()


# -- GCRA -------------------------------------------------------------------------------


async def test_burst_admits_exactly_the_limit(store: Store) -> None:
    quotas = [await store.take("rl", limit=5, period=10) for _ in range(8)]
    assert [q.allowed for q in quotas] == [True] * 5 + [False] * 3
    assert [q.remaining for q in quotas] == [4, 3, 2, 1, 0, 0, 0, 0]


async def test_concurrent_burst_admits_exactly_the_limit(store: Store) -> None:
    quotas = await asyncio.gather(*(store.take("rl", limit=10, period=10) for _ in range(25)))
    assert sum(q.allowed for q in quotas) == 10
    assert sorted(q.remaining for q in quotas if q.allowed) == list(range(10))


async def test_keys_have_separate_budgets(store: Store) -> None:
    assert (await store.take("a", limit=1, period=10)).allowed
    assert not (await store.take("a", limit=1, period=10)).allowed
    assert (await store.take("b", limit=1, period=10)).allowed


async def test_reset_and_retry_after(store: Store, tolerance: float) -> None:
    quotas = [await store.take("rl", limit=2, period=0.4) for _ in range(3)]  # T = 0.2s
    assert [(q.allowed, q.remaining) for q in quotas] == [(True, 1), (True, 0), (False, 0)]
    assert [q.reset_after for q in quotas] == pytest.approx([0.2, 0.4, 0.4], abs=tolerance)
    assert [q.retry_after for q in quotas] == pytest.approx([0.0, 0.0, 0.2], abs=tolerance)
    assert quotas[0].retry_after == quotas[1].retry_after == 0.0


async def test_admitted_after_retry_after(store: Store, advance: Advance, store_kind: str) -> None:
    for _ in range(2):
        await store.take("rl", limit=2, period=0.4)
    rejected = await store.take("rl", limit=2, period=0.4)
    assert not rejected.allowed
    # a client that waits Retry-After is admitted; on Redis, allow for the clocks' granularity
    await advance(rejected.retry_after + (0 if store_kind == "memory" else 0.002))
    again = await store.take("rl", limit=2, period=0.4)
    assert again.allowed
    assert again.remaining == 0
    assert not (await store.take("rl", limit=2, period=0.4)).allowed


async def test_full_budget_after_reset_after(store: Store, advance: Advance, store_kind: str) -> None:
    for _ in range(3):
        last = await store.take("rl", limit=3, period=0.3)
    await advance(last.reset_after + (0 if store_kind == "memory" else 0.002))
    quotas = [await store.take("rl", limit=3, period=0.3) for _ in range(4)]
    assert [q.remaining for q in quotas] == [2, 1, 0, 0]
    assert [q.allowed for q in quotas] == [True, True, True, False]


async def test_rejections_do_not_spend(store: Store, advance: Advance, store_kind: str) -> None:
    await store.take("rl", limit=1, period=0.2)
    for _ in range(5):
        rejected = await store.take("rl", limit=1, period=0.2)
        assert not rejected.allowed
    await advance(rejected.retry_after + (0 if store_kind == "memory" else 0.002))
    assert (await store.take("rl", limit=1, period=0.2)).allowed


@pytest.mark.parametrize(
    ("limit", "period"),
    [
        pytest.param(0, 1.0, id="zero limit"),
        pytest.param(1, 0.0, id="zero period"),
        pytest.param(1, -1.0, id="negative period"),
    ],
)
async def test_take_rejects_bad_budgets(store: Store, limit: int, period: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        await store.take("rl", limit=limit, period=period)


async def test_take_without_spending_changes_nothing(store: Store) -> None:
    await store.take("peek", limit=3, period=60)
    looks = [await store.take("peek", limit=3, period=60, spend=False) for _ in range(5)]
    assert {(q.allowed, q.remaining) for q in looks} == {(True, 1)}  # what spending one would leave
    assert [(await store.take("peek", limit=3, period=60)).allowed for _ in range(3)] == [True, True, False]
    assert not (await store.take("peek", limit=3, period=60, spend=False)).allowed
