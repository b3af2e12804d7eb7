"""What only the Redis store has: the same answers as memory to the microsecond, bounded calls
when Redis is down or black-holed, recovery without a new store, URLs, and Cluster slots."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import hiredis
import pytest
import redis
import redis.cluster
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.config import StoreConfig
from gateway.stores import MemoryStore, RedisStore, open_store
from gateway.stores.gcra import interval_us
from gateway.stores.redis_pipe import Command
from middleware.base import AddToSet, Put, Remove, Store, StoreUnavailable
from tests.conftest import free_port
from tests.redis_servers import RedisServer
from tests.stores.conftest import FakeClock, store_url, unique_namespace

REDIS_KINDS = ["redis", "cluster"]
BOUND = 0.5  # seconds a call may take to give up, with the default 50 ms timeout (generous for CI)


@pytest.fixture(params=REDIS_KINDS)
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(store_url(request, request.param), namespace=unique_namespace(), timeout=0.5)
    await store.ping()
    yield store
    await store.aclose()


# -- the same arithmetic twice -------------------------------------------------------------


def _sequence(seed: int) -> list[tuple[int, int, float]]:
    """(µs since the previous request, limit, period): bursts, pauses and a changed limit."""
    rng = random.Random(seed)
    steps = []
    for n in range(300):
        limit, period = (5, 10.0) if n < 200 else (3, 7.0)  # periods long enough that no TTL ends mid-test
        gap = rng.choice([0, 1, rng.randrange(1, 2_000_000), rng.randrange(1, 5_000_000)])
        steps.append((gap, limit, period))
    return steps


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_same_answers_as_memory(redis_store: RedisStore, seed: int) -> None:
    clock = FakeClock(1000.0)
    memory = MemoryStore(clock=clock)
    now_us = 1_700_000_000_000_000  # a Redis TIME-sized number: formatting must keep every digit
    for gap, limit, period in _sequence(seed):
        clock.now = round(clock.now * 1_000_000 + gap) / 1_000_000
        now_us += gap
        expected = await memory.take("rl", limit=limit, period=period)
        assert await redis_store.take("rl", limit=limit, period=period, now_us=now_us) == expected


async def test_admitted_at_exactly_retry_after(redis_store: RedisStore) -> None:
    now = 1_700_000_000_000_000
    for _ in range(3):
        rejected = await redis_store.take("rl", limit=2, period=1.0, now_us=now)
    retry_us = round(rejected.retry_after * 1_000_000)
    assert (rejected.allowed, retry_us) == (False, 500_000)
    assert not (await redis_store.take("rl", limit=2, period=1.0, now_us=now + retry_us - 1)).allowed
    assert (await redis_store.take("rl", limit=2, period=1.0, now_us=now + retry_us)).allowed


@pytest.mark.parametrize("key", ["rl:users:ip:10.0.0.1", "rl:users:sub:élodie", "rl:{odd}:sub:a b"])
@pytest.mark.parametrize(("limit", "period", "spend"), [(10**9, 1.0, True), (5, 60.0, False), (3, 0.25, True)])
async def test_a_take_is_sent_as_the_command_hiredis_would_pack(
    key: str, limit: int, period: float, spend: bool
) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1", namespace="gw:")
    expected = (
        "EVALSHA", store._gcra.sha, 1, store.key(key), interval_us(limit, period), limit, 1 if spend else 0
    )  # fmt: skip
    for _ in range(2):  # the second time from the packed arguments it keeps
        assert store._take_command(key, limit, period, spend) == hiredis.pack_command(expected)
    await store.aclose()


async def test_batched_takes_spend_the_budget_of_their_own_limit(redis_store: RedisStore) -> None:
    answers = [await redis_store.take("rl", limit=3, period=60.0) for _ in range(4)]
    assert [(q.allowed, q.remaining) for q in answers] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert 59.0 < answers[2].reset_after <= 60.0 and 19.0 < answers[3].retry_after <= 20.0
    looked = await redis_store.take("rl", limit=6, period=120.0, spend=False)  # another limit, nothing spent
    assert (looked.allowed, looked.remaining) == (True, 2)
    assert (await redis_store.take("rl", limit=6, period=120.0, spend=False)).remaining == 2
    assert (await redis_store.take("rl", limit=6, period=120.0)).remaining == 2  # and spent this time
    for _ in range(2):  # looking spends nothing
        assert (await redis_store.take("rl", limit=6, period=120.0, spend=False)).remaining == 1


async def test_script_reloaded_after_flush(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=unique_namespace())
    await store.take("rl", limit=2, period=1)
    with redis_server.client() as client:
        client.script_flush()
    assert (await store.take("rl", limit=2, period=1)).remaining == 0
    await store.aclose()


async def test_get_many_or_add_script_reloaded_after_flush(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=unique_namespace())
    await store.get_many_or_add("c:{s}:e", add="c:{s}:l1", value=b"1", ttl=60)
    with redis_server.client() as client:
        client.script_flush()
    assert await store.get_many_or_add("c:{s}:e", add="c:{s}:l2", value=b"1", ttl=60) == ([None], True)
    assert await store.get("c:{s}:l2") == b"1"
    await store.aclose()


async def test_write_script_reloaded_after_flush(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=unique_namespace())
    await store.write(Put("c:{s}:a", b"1", 60))
    with redis_server.client() as client:
        client.script_flush()
    await store.write(Put("c:{s}:b", b"2", 60), AddToSet("c:{s}:i", ("b /x",), 60), Remove(("c:{s}:a",)))
    assert await store.get_many("c:{s}:a", "c:{s}:b") == [None, b"2"]
    assert await store.smembers("c:{s}:i") == {"b /x"}
    await store.aclose()


async def test_namespaces_are_separate(redis_server: RedisServer) -> None:
    one, two = (RedisStore.from_url(redis_server.url, namespace=unique_namespace()) for _ in range(2))
    await one.set("k", b"one", ttl=60)
    assert await two.get("k") is None
    assert (await one.take("rl", limit=1, period=60)).allowed
    assert (await two.take("rl", limit=1, period=60)).allowed
    for store in (one, two):
        await store.aclose()


# -- Redis down, black-holed, back ------------------------------------------------------------

Call = Callable[[Store], Awaitable[object]]
CALLS: list[Call] = [
    lambda store: store.take("rl", limit=5, period=1),
    lambda store: store.get("k"),
    lambda store: store.set("k", b"v", ttl=5),
    lambda store: store.delete("k"),
    lambda store: store.incr("n"),
    lambda store: store.get_many_or_add("c:{s}:e", add="c:{s}:l", value=b"1", ttl=5),
    lambda store: store.ping(),
]


async def _all_unavailable(store: Store) -> None:
    for call in CALLS:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call(store)
        assert time.monotonic() - started < BOUND


async def test_down_then_back_without_a_new_store(restartable_redis: RedisServer) -> None:
    store = open_store(StoreConfig(url=restartable_redis.url), namespace=unique_namespace())  # 50 ms
    await store.ping()
    assert (await store.take("rl", limit=5, period=1)).allowed
    restartable_redis.stop(kill=True)
    await _all_unavailable(store)
    restartable_redis.start()
    await store.ping()  # the first call after the restart already works
    assert (await store.take("rl", limit=5, period=1)).remaining == 4  # a fresh Redis: a fresh budget
    await store.aclose()


async def test_black_hole_is_bounded(restartable_redis: RedisServer) -> None:
    store = open_store(StoreConfig(url=restartable_redis.url), namespace=unique_namespace())
    await store.set("k", b"v", ttl=60)
    restartable_redis.pause()  # connections are accepted, nothing is answered
    try:
        await _all_unavailable(store)
    finally:
        restartable_redis.resume()
    assert await store.get("k") == b"v"
    await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://127.0.0.1:{port}/0", id="refused"),
        pytest.param("redis://10.255.255.1:6379/0", id="unroutable"),
        pytest.param("redis+cluster://127.0.0.1:{port}", id="cluster refused"),
    ],
)
async def test_never_reachable_is_bounded(url: str) -> None:
    store = open_store(StoreConfig(url=url.format(port=free_port())), namespace="t:")
    await _all_unavailable(store)
    await store.aclose()


# -- opening -------------------------------------------------------------------------------


async def test_open_memory() -> None:
    store = open_store(StoreConfig(url="memory://", max_memory=12345))
    assert isinstance(store, MemoryStore)
    assert store.max_bytes == 12345


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://user:secret@redis.example:6380/1", "unix:///run/redis.sock"]
)
async def test_open_single_node(url: str) -> None:
    store = open_store(StoreConfig(url=url, timeout=0.2))  # nothing connects yet
    assert isinstance(store, RedisStore)
    assert isinstance(store.client, Redis)
    assert store.client.connection_pool.connection_kwargs["socket_connect_timeout"] == 0.2
    await store.aclose()


@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        pytest.param("redis+cluster://h1:7000,h2:7001", {"h1:7000", "h2:7001"}, id="two"),
        pytest.param("redis+cluster://u:p%40ss@h1:7000", {"h1:7000"}, id="credentials"),
        pytest.param("redis+cluster://[::1]:7000,h2", {"::1:7000", "h2:6379"}, id="ipv6 and default port"),
        pytest.param("rediss+cluster://h1:7000", {"h1:7000"}, id="tls"),
    ],
)
async def test_open_cluster(url: str, nodes: set[str]) -> None:
    store = open_store(StoreConfig(url=url))
    assert isinstance(store, RedisStore)
    assert isinstance(store.client, RedisCluster)
    assert set(store.client.nodes_manager.startup_nodes) == nodes
    await store.aclose()


@pytest.mark.parametrize("url", ["http://redis", "redis", "memcached://h:11211"])
def test_open_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported store url"):
        open_store(StoreConfig(url=url))


# -- Cluster ---------------------------------------------------------------------------------


async def test_key_carries_a_hash_tag() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1", namespace="gw:")
    assert store.key("rl:users:1.2.3.4") == "gw:{rl:users:1.2.3.4}"
    other = RedisStore.from_url("redis://127.0.0.1:1", namespace="other:")
    # the namespace never moves a key; a caller's own {tag} groups keys
    assert key_slot(store.key("rl:a").encode()) == key_slot(other.key("rl:a").encode()) == key_slot(b"rl:a")
    assert key_slot(store.key("c:{users}:gen").encode()) == key_slot(store.key("c:{users}:e:1").encode())
    await store.aclose()
    await other.aclose()


def test_namespace_without_braces() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore.from_url("redis://127.0.0.1:1", namespace="{gw}:")


async def test_cluster_keys_land_in_their_slot(redis_cluster: str) -> None:
    store = RedisStore.from_url(redis_cluster, namespace=unique_namespace(), timeout=0.5)
    keys = [f"rl:{n}" for n in range(30)]  # spread over the three nodes: the script loads on each
    for key in keys:
        assert (await store.take(key, limit=1, period=60)).allowed
    host, port = redis_cluster.removeprefix("redis+cluster://").split(",")[0].split(":")
    with redis.cluster.RedisCluster(host=host, port=int(port)) as client:
        slots = {client.keyslot(store.key(key)) for key in keys}
        assert slots == {key_slot(key.encode()) for key in keys}
        assert len({client.nodes_manager.get_node_from_slot(slot).name for slot in slots}) == 3
        assert client.exists(*(store.key(key) for key in keys)) == len(keys)
    await store.aclose()


async def test_cluster_node_black_hole_is_bounded(redis_cluster: str, redis_cluster_servers: list[RedisServer]) -> None:
    paused = redis_cluster_servers[0]
    store = RedisStore.from_url(redis_cluster, namespace=unique_namespace())  # 50 ms
    await store.ping()
    on_paused = [key for key in (f"rl:{n}" for n in range(100)) if _port_of(store, key) == paused.port]
    elsewhere = [key for key in (f"rl:{n}" for n in range(100)) if _port_of(store, key) != paused.port]
    paused.pause()  # briefly: well under --cluster-node-timeout, so the Cluster itself stays ok
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.take(on_paused[0], limit=5, period=1)
        assert time.monotonic() - started < BOUND
        assert (await store.take(elsewhere[0], limit=5, period=1)).allowed  # the other slots still answer
    finally:
        paused.resume()
    deadline = time.monotonic() + 5
    while True:  # redis-py re-reads the layout after the failure; the node answers again
        try:
            assert (await store.take(on_paused[1], limit=5, period=1)).allowed
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    await store.aclose()


def _port_of(store: RedisStore, key: str) -> int:
    assert isinstance(store.client, RedisCluster)
    node = store.client.nodes_manager.get_node_from_slot(key_slot(store.key(key).encode()))
    return int(node.port)


async def test_cluster_ready_even_when_startup_outlasts_the_timeout(redis_cluster: str) -> None:
    # reading the Cluster's layout and command table takes longer than 1 ms (a few ms here; 10 ms
    # was not always longer): calls before that fail, but the startup is not cut short by them,
    # and a ping waits for it
    store = RedisStore.from_url(redis_cluster, namespace=unique_namespace(), timeout=0.001)
    with pytest.raises(StoreUnavailable, match="no answer within 1ms"):
        await store.get("k")
    deadline = time.monotonic() + 5
    while True:
        try:
            await store.ping()
            break
        except StoreUnavailable:  # a 1 ms ping may miss on a busy machine; the startup is done
            assert time.monotonic() < deadline
    await store.aclose()


@pytest.fixture
async def own_store(restartable_redis: RedisServer) -> AsyncIterator[Store]:
    """A store on the test's own Redis (``restartable_redis``), with a timeout no busy machine misses."""
    store = open_store(StoreConfig(url=restartable_redis.url, timeout=2.0), namespace=unique_namespace())
    yield store
    await store.aclose()


async def test_takes_of_one_turn_share_one_connection(restartable_redis: RedisServer, own_store: Store) -> None:
    await own_store.ping()
    quotas = await asyncio.gather(*(own_store.take(f"k{i}", limit=5, period=60) for i in range(50)))
    assert all(q.allowed and q.remaining == 4 for q in quotas)
    with restartable_redis.client() as check:
        clients = int(check.info("clients")["connected_clients"])
    assert clients <= 3  # this check's own client, and the store's pool: one pipeline, not 50 connections


async def test_commands_of_one_turn_share_one_connection_and_keep_their_own_results(
    restartable_redis: RedisServer, own_store: Store
) -> None:
    await own_store.ping()
    await asyncio.gather(*(own_store.set(f"k{i}", b"v%d" % i, ttl=60) for i in range(50)))
    values, many, added, (_, members) = await asyncio.gather(
        asyncio.gather(*(own_store.get(f"k{i}") for i in range(50))),
        own_store.get_many("k1", "nothing", "k2"),
        asyncio.gather(own_store.add("k3", b"x", ttl=60), own_store.add("fresh", b"x", ttl=60)),
        asyncio.gather(own_store.sadd("set", "a", "b", ttl=60), own_store.smembers("set")),
    )
    assert values == [b"v%d" % i for i in range(50)]
    assert many == [b"v1", None, b"v2"]
    assert added == [False, True]
    assert members == {"a", "b"}  # staged after the SADD of the same turn, so it sees it
    assert await own_store.delete("k1", "k2", "nothing") == 2
    with restartable_redis.client() as check:
        clients = int(check.info("clients")["connected_clients"])
    assert clients <= 3  # this check's own client, and the store's pool: pipelines, not 50 connections


async def test_a_full_batch_goes_out_at_once_and_the_rest_when_the_turn_ends(
    monkeypatch: pytest.MonkeyPatch, own_store: Store
) -> None:
    assert isinstance(own_store, RedisStore)
    await own_store.ping()
    own_store.batch_entries = 4
    sent: list[list[object]] = []
    send = own_store._pipe.send

    def spy(commands: list[Command], done: Callable[..., None]) -> None:
        sent.append(list(commands))
        send(commands, done)

    monkeypatch.setattr(own_store._pipe, "send", spy)
    await own_store.set("k3", b"v3", ttl=60)
    sent.clear()
    values = await asyncio.gather(*(own_store.get(f"k{i}") for i in range(10)))  # all queued in one turn
    assert values == [None, None, None, b"v3", *[None] * 6]  # each caller its own reply
    assert [len(commands) for commands in sent] == [4, 4, 2]  # two as they filled up, the rest as the turn ended


async def test_one_failing_command_fails_only_its_own_caller(restartable_redis: RedisServer, own_store: Store) -> None:
    await own_store.ping()
    await own_store.sadd("a-set", "m", ttl=60)
    results = await asyncio.gather(own_store.get("a-set"), own_store.set("k", b"v", ttl=60), return_exceptions=True)
    assert isinstance(results[0], StoreUnavailable)  # GET of a set: WRONGTYPE
    assert "WRONGTYPE" in str(results[0])
    assert results[1] is None
    assert await own_store.get("k") == b"v"


async def test_a_batch_reads_the_same_replies_through_redis_pys_own_parser(restartable_redis: RedisServer) -> None:
    # the store reads a batch's replies from the hiredis reader itself; with any other parser it
    # goes through connection.read_response(), and callers must not tell the difference
    client = Redis.from_url(restartable_redis.url, socket_timeout=None, parser_class=_AsyncRESP2Parser)
    store = RedisStore(client, namespace=unique_namespace(), timeout=2.0)
    try:
        await store.sadd("a-set", "m", ttl=60)
        results = await asyncio.gather(
            store.get("a-set"), store.set("k", b"v", ttl=60), store.get_many("k", "none"), return_exceptions=True
        )
        assert isinstance(results[0], StoreUnavailable) and "WRONGTYPE" in str(results[0])
        assert results[1:] == [None, [b"v", None]]
        assert (await store.take("t", limit=2, period=60)).remaining == 1
    finally:
        await store.aclose()


async def test_a_connection_redis_closed_is_replaced_within_the_same_call(
    restartable_redis: RedisServer, own_store: Store
) -> None:
    await own_store.set("k", b"v", ttl=60)
    with restartable_redis.client() as check:
        assert check.client_kill_filter(_type="normal", skipme=True) >= 1  # the store's pooled connection
    assert await own_store.get("k") == b"v"  # no StoreUnavailable: one more try on a fresh connection


async def test_a_call_cut_short_leaves_no_reply_behind_for_the_next_one(restartable_redis: RedisServer) -> None:
    store = open_store(StoreConfig(url=restartable_redis.url, timeout=0.2), namespace=unique_namespace())
    try:
        await store.set("a", b"1", ttl=60)
        await store.set("b", b"2", ttl=60)
        restartable_redis.pause()  # the GET below is sent, and answered only after its timeout
        try:
            with pytest.raises(StoreUnavailable):
                await store.get("a")
        finally:
            restartable_redis.resume()
        assert await store.get("b") == b"2"  # not the late reply to the GET of "a"
        assert await store.get("a") == b"1"
    finally:
        await store.aclose()


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_a_password_and_a_database_number_apply_to_the_batched_commands(tmp_path: Path, over: str) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, "--unixsocket", str(socket_path))
    server.start()
    try:
        with server.client() as setup:
            setup.config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3" if over == "tcp" else f"unix://:s3cret@{socket_path}?db=3"
        store = open_store(StoreConfig(url=url, timeout=2.0), namespace="t:")
        try:
            results = await asyncio.gather(
                store.set("k", b"v", ttl=60), store.take("rl", limit=5, period=60), store.sadd("s", "m", ttl=60)
            )
            assert results[1].remaining == 4
            assert await store.get("k") == b"v"
        finally:
            await store.aclose()
        with redis.Redis(port=server.port, password="s3cret", db=3) as check:
            assert check.get("t:{k}") == b"v"  # in database 3, where the URL said
        with redis.Redis(port=server.port, password="s3cret", db=0) as check:
            assert check.dbsize() == 0
    finally:
        server.stop()


async def test_after_a_script_flush_the_rest_of_the_batch_runs_once(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=unique_namespace(), timeout=2.0)
    try:
        await store.take("rl", limit=5, period=60)
        with redis_server.client() as client:
            client.script_flush()
        quota, count = await asyncio.gather(store.take("rl", limit=5, period=60), store.incr("n"))  # one batch
        assert (quota.remaining, count) == (3, 1)
        assert await store.incr("n") == 2
        assert (await store.take("rl", limit=5, period=60)).remaining == 2
    finally:
        await store.aclose()


# -- the pipe: batches written back to back on one connection -------------------------------


def _store_connections(server: RedisServer) -> int:
    """Clients connected to ``server`` other than the one asking."""
    with server.client() as check:
        return int(check.info("clients")["connected_clients"]) - 1


async def test_a_batch_is_sent_while_earlier_ones_still_wait_for_their_replies(
    restartable_redis: RedisServer, own_store: Store
) -> None:
    await own_store.set("a", b"1", ttl=60)
    await own_store.set("b", b"2", ttl=60)
    restartable_redis.pause()  # nothing is answered: the first batch is still waiting when the next goes out
    try:
        first = asyncio.ensure_future(own_store.get("a"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(own_store.get_many("b", "a"))
        await asyncio.sleep(0.05)
        third = asyncio.ensure_future(own_store.incr("n"))
        await asyncio.sleep(0.05)
    finally:
        restartable_redis.resume()
    assert await asyncio.gather(first, second, third) == [b"1", [b"2", b"1"], 1]  # each its own reply, in order
    assert _store_connections(restartable_redis) == 1  # one connection carried all three


async def test_a_caller_that_gave_up_leaves_its_reply_to_nobody_else(
    restartable_redis: RedisServer, own_store: Store
) -> None:
    await own_store.set("a", b"1", ttl=60)
    await own_store.set("b", b"2", ttl=60)
    restartable_redis.pause()
    try:
        abandoned = asyncio.ensure_future(own_store.get("a"))
        await asyncio.sleep(0.05)
        abandoned.cancel()  # its request went away; the GET is already on the wire
        kept = asyncio.ensure_future(own_store.get("b"))
        await asyncio.sleep(0.05)
    finally:
        restartable_redis.resume()
    assert await kept == b"2"
    assert abandoned.cancelled()
    assert await own_store.get("a") == b"1"


async def test_closing_the_store_fails_what_is_under_way_and_leaves_nothing_running(
    restartable_redis: RedisServer,
) -> None:
    store = open_store(StoreConfig(url=restartable_redis.url, timeout=2.0), namespace=unique_namespace())
    await store.ping()
    await store.set("a", b"1", ttl=60)
    restartable_redis.pause()
    try:
        pending = asyncio.ensure_future(store.get("a"))
        await asyncio.sleep(0.05)
        before = asyncio.all_tasks()
        await store.aclose()
        with pytest.raises(StoreUnavailable, match="closed"):
            await pending
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.get("a")
    finally:
        restartable_redis.resume()
    await asyncio.sleep(0)
    assert not [task for task in asyncio.all_tasks() - before if not task.done()]
    assert all(task.done() for task in before if "Pipe" in repr(task))  # its reader is gone too
