"""The Redis store (DESIGN §9): one Redis, or a Redis Cluster, shared by every gateway instance.

One client (and so one connection pool) per store, which the app opens once per process.
Every call goes through :meth:`RedisStore._edge`, the one place that bounds it by ``timeout``
(retries and reconnects included) and translates whatever redis-py raises into
:class:`~middleware.base.StoreUnavailable`. A broken connection is dropped and a new one made
on the next call, so the store recovers when Redis comes back.

``take`` is one ``EVALSHA`` of :data:`gateway.stores.gcra.LUA`, with the time taken from the
Redis server so that instances agree; ``get_many_or_add`` one of :data:`GET_MANY_OR_ADD`; ``write``
one of :data:`WRITE` (on one Redis). The scripts are loaded again automatically after a Redis restart.
On one Redis, the commands that requests start in the same turn of the event loop (takes, cache
lookups, stores, locks) go out together in one pipeline: one round trip and one connection for
all of them (256 requests' commands at most: a burst beyond that goes out in full batches as they
fill, which Redis, on another core, works on while the turn goes on). redis-py's cost per call (a pooled connection
taken and given back, a round trip awaited) is most of what a command costs the gateway in CPU,
so this "auto-pipelining" (ioredis has it too) is what keeps a busy gateway's Redis bill low.
Each command is still its own atomic step; one request's commands still run in its order. The
batches go out on one connection kept for them (:class:`gateway.stores.redis_pipe.Pipe`), each
written as soon as it is full or its turn ends, without waiting for the replies to earlier ones;
one reader task takes the replies off in order. There is no redis-py ``Pipeline`` (its
per-command bookkeeping, reply callbacks and per-call instrumentation were about half of what a
Redis command cost the gateway) and no pool checkout, task or timeout context per batch (most of
the rest); commands are packed by hiredis (a take by the store: see ``_take_command``).
Connecting, AUTH, TLS, SELECT and reading replies (with hiredis's parser) are still redis-py's.
Keys are ``<namespace>{<key>}``. The braces are a Cluster hash tag: the slot depends on the
caller's key up to its first ``}`` (all of it when it has none), never on the namespace, so
``c:{users}:gen`` and ``c:{users}:e:1`` share a slot, for a future script over both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.stores.gcra import LUA, interval_us, quota
from gateway.stores.redis_pipe import Command, Pipe
from middleware.base import AddToSet, Change, Put, Quota, StoreUnavailable

__all__ = ("RedisStore",)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Client = Redis | RedisCluster
Batch = list[tuple[tuple[Command, ...], "asyncio.Future[list[Any]]"]]  # each request's commands, and who waits for them

# RedisError covers ConnectionError, TimeoutError, ClusterDownError, TryAgainError, ReadOnlyError
# (failover) and BusyLoadingError; RedisClusterException covers SlotNotCoveredError and friends.
_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
_STARTUP_TIMEOUT = 5.0  # seconds the client's one-time initialisation may take, whatever the call timeout

# KEYS: the keys to read, then the key to add when the last of them is absent. ARGV[1]: the value
# to add, ARGV[2]: its ttl in ms. Returns the values read, then 1 when the key was added, else 0.
GET_MANY_OR_ADD = """
local values = redis.call('MGET', unpack(KEYS, 1, #KEYS - 1))
local added = 0
if not values[#values] and redis.call('SET', KEYS[#KEYS], ARGV[1], 'NX', 'PX', ARGV[2]) then
  added = 1
end
values[#values + 1] = added
return values
"""


# KEYS: the key of each change step, in order. ARGV: for each key, its step and the step's arguments:
# 'S', value, ttl in ms (SET PX) | 'A', ttl in ms, member count, members... (SADD, then PEXPIRE) | 'D' (DEL).
# One script instead of a command per step: one reply for the whole write, and the steps atomic.
WRITE = """
local at = 1
for i = 1, #KEYS do
  local step = ARGV[at]
  if step == 'S' then
    redis.call('SET', KEYS[i], ARGV[at + 1], 'PX', ARGV[at + 2])
    at = at + 3
  elseif step == 'A' then
    local count = tonumber(ARGV[at + 2])
    redis.call('SADD', KEYS[i], unpack(ARGV, at + 3, at + 2 + count))
    redis.call('PEXPIRE', KEYS[i], ARGV[at + 1])
    at = at + 3 + count
  else
    redis.call('DEL', KEYS[i])
    at = at + 1
  end
end
return #KEYS
"""
# requests' commands in one batch at most: bounds what a burst of requests in one turn writes at once. Not
# lower: 16 (bench/README.md, eleventh and twelfth sessions) split a busy turn's batch in four and cost
# about 10% more CPU per full-chain request at 64 connections, for no more requests a second.
_BATCH_ENTRIES = 256
_MAX_MEMBERS = 1000  # set members one write step may add (Lua's unpack takes a few thousand at most)


async def _nothing() -> None:
    """A write with no change: nothing to wait for."""


class RedisStore:
    """A :class:`~middleware.base.Store` on Redis or Redis Cluster; see :func:`gateway.stores.open_store`.

    Nothing connects until the first call.
    """

    def __init__(self, client: Client, *, namespace: str = "gw:", timeout: float = 0.05) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must not contain braces (a Cluster hash tag): {namespace!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._client = client
        self._namespace = namespace
        self._timeout = timeout
        self._gcra = client.register_script(LUA)
        self._get_many_or_add = client.register_script(GET_MANY_OR_ADD)
        self._write = client.register_script(WRITE)
        # loaded again after a flush
        self._scripts = (self._gcra.script, self._get_many_or_add.script, self._write.script)
        # a take's EVALSHA in RESP, but for its key and the arguments after it (see _take_command)
        self._take_head = b"*7\r\n" + _bulks("EVALSHA", self._gcra.sha, 1)
        # pure functions of a route's settings, remembered per store: the same few come with every request
        self._take_tail = functools.lru_cache(maxsize=1024)(_take_tail)
        self._ms = functools.lru_cache(maxsize=1024)(_ms)
        self._detach = isinstance(client, RedisCluster)
        self._ready = False
        self._starting: asyncio.Task[None] | None = None
        self._batch: Batch = []  # commands waiting to be sent (one Redis)
        self._batch_loop: asyncio.AbstractEventLoop | None = None  # the loop running while they were queued
        self.batch_entries = _BATCH_ENTRIES
        self._sending: set[asyncio.Task[None]] = set()  # batches that met a flushed script
        self._loading_scripts = asyncio.Lock()
        self._pipe = Pipe(lambda: self._edge("connect", self._checked_out), self._checked_in, timeout=timeout)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "gw:", timeout: float = 0.05) -> RedisStore:
        """``redis://``, ``rediss://`` or ``unix://`` for one Redis; ``redis+cluster://h1:p1,h2:p2``
        (or ``rediss+cluster://``, TLS) for a Cluster, given any of its nodes."""
        retry = Retry(NoBackoff(), 1)  # once, on a fresh connection: a pooled one may be stale
        client: Client
        if url.partition("://")[0].lower() in ("redis+cluster", "rediss+cluster"):
            client = _cluster_from_url(url, timeout=timeout, retry=retry)
        else:
            # socket_timeout=None (redis-py 8 defaults it to 5 s): _edge bounds the whole call, and
            # redis-py would wrap every reply it reads in a timeout of its own (~10% of a full chain's CPU)
            client = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=None, retry=retry)
        return cls(client, namespace=namespace, timeout=timeout)

    @property
    def client(self) -> Client:
        """The redis-py client (for diagnostics and tests; calls on it bypass the timeout)."""
        return self._client

    def key(self, key: str) -> str:
        """The Redis key that holds ``key``: ``<namespace>{<key>}``."""
        return f"{self._namespace}{{{key}}}"

    async def take(
        self, key: str, *, limit: int, period: float, spend: bool = True, now_us: int | None = None
    ) -> Quota:
        """``now_us`` (tests only) replaces Redis's clock, to replay a sequence of times against
        the Python arithmetic."""
        if self._detach or now_us is not None:
            keys, args = [self.key(key)], [interval_us(limit, period), limit, 1 if spend else 0]
            if now_us is not None:
                args.append(now_us)
            result = await self._edge("take", lambda client: self._gcra(keys=keys, args=args, client=client))
        else:
            (result,) = await self._batched(self._take_command(key, limit, period, spend))
        allowed, remaining, reset_us, retry_us = result
        return quota(allowed, remaining, reset_us, retry_us)

    async def get(self, key: str) -> bytes | None:
        name = self.key(key)
        value = await self._call("get", lambda redis: redis.get(name), ("GET", name))
        return cast("bytes | None", value)  # responses are not decoded

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds (rounded up to whole ms); zero or less deletes it."""
        if ttl <= 0:
            await self.delete(key)
            return
        name, px = self.key(key), self._ms(ttl)
        await self._call("set", lambda redis: redis.set(name, value, px=px), self._set_command(key, value, ttl))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        names = [self.key(key) for key in keys]
        found = await self._call(
            "delete", lambda redis: redis.delete(*names), ("DEL", *names)
        )  # split by slot on a Cluster
        return int(found)

    async def add(self, key: str, value: bytes, *, ttl: float) -> bool:
        """``SET NX PX``: stored only when absent."""
        if ttl <= 0:
            return False
        name, px = self.key(key), self._ms(ttl)
        stored = await self._call(
            "add", lambda redis: redis.set(name, value, px=px, nx=True), (*self._set_command(key, value, ttl), "NX")
        )
        return bool(stored)

    async def get_many(self, *keys: str) -> list[bytes | None]:
        if not keys:
            return []
        names = [self.key(key) for key in keys]
        if self._detach:  # one MGET per slot; one round trip when the keys share a hash tag
            values = await self._edge("get_many", lambda client: client.mget_nonatomic(names))  # type: ignore[union-attr]
        else:
            (values,) = await self._batched(("MGET", *names))
        return cast("list[bytes | None]", values)

    async def add_and_get(self, key: str, value: bytes, *, ttl: float, then: str) -> tuple[bool, bytes | None]:
        """``SET NX PX`` then ``GET``, in one batch (on a Cluster: one call, then the other)."""
        if self._detach or ttl <= 0:
            return await self.add(key, value, ttl=ttl), await self.get(then)
        stored, found = await self._batched((*self._set_command(key, value, ttl), "NX"), ("GET", self.key(then)))
        return bool(stored), cast("bytes | None", found)

    async def get_many_or_add(self, *keys: str, add: str, value: bytes, ttl: float) -> tuple[list[bytes | None], bool]:
        """One ``EVALSHA`` of :data:`GET_MANY_OR_ADD` (on a Cluster too: the keys share a slot)."""
        if ttl <= 0:  # nothing can be added: a plain read
            return await self.get_many(*keys), False
        names = [self.key(key) for key in (*keys, add)]
        args: list[bytes | int] = [value, self._ms(ttl)]
        if self._detach:
            script = self._get_many_or_add
            replies = await self._edge("get_many_or_add", lambda client: script(keys=names, args=args, client=client))
        else:
            (replies,) = await self._batched(("EVALSHA", self._get_many_or_add.sha, len(names), *names, *args))
        *values, added = replies
        return cast("list[bytes | None]", values), added == 1

    def write(self, *changes: Change) -> Awaitable[None]:
        """Every change's commands in one batch (on a Cluster: one call after another). On one
        Redis, the batch's pending reply itself: no coroutine frame on the caller's wait."""
        if self._detach:
            return self._write_each(changes)
        name = self.key
        keys: list[str] = []
        args: list[bytes | str | int] = []
        for change in changes:  # the steps of WRITE: what set, sadd and delete do
            if isinstance(change, Put):
                keys.append(name(change.key))
                args += ("S", change.value, self._ms(change.ttl)) if change.ttl > 0 else ("D",)
            elif isinstance(change, AddToSet):
                members = change.members
                for start in range(0, len(members), _MAX_MEMBERS):
                    part = members[start : start + _MAX_MEMBERS]
                    keys.append(name(change.key))
                    args += ("A", self._ms(change.ttl), len(part), *part)
            else:
                keys += map(name, change.keys)
                args += ("D",) * len(change.keys)
        if not keys:
            return _nothing()
        return cast("Awaitable[None]", self._batched(("EVALSHA", self._write.sha, len(keys), *keys, *args)))

    async def _write_each(self, changes: tuple[Change, ...]) -> None:
        """On a Cluster: each change with its own call (their keys may live on different nodes)."""
        for change in changes:
            if isinstance(change, Put):
                await self.set(change.key, change.value, ttl=change.ttl)
            elif isinstance(change, AddToSet):
                await self.sadd(change.key, *change.members, ttl=change.ttl)
            else:
                await self.delete(*change.keys)

    def _take_command(self, key: str, limit: int, period: float, spend: bool) -> bytes:
        """``EVALSHA <gcra> 1 <key> <interval> <limit> <spend>`` in RESP. Packed here, not by
        hiredis, which costs about 1.6k instructions an argument: of a route's takes only the key
        changes, so the rest is packed once (with the interval worked out once too)."""
        name = self.key(key).encode()
        return b"%b$%d\r\n%b\r\n%b" % (self._take_head, len(name), name, self._take_tail(limit, period, spend))

    def _set_command(self, key: str, value: bytes, ttl: float) -> Command:
        return ("SET", self.key(key), value, "PX", self._ms(ttl))

    def _sadd_commands(self, key: str, members: tuple[str, ...], ttl: float) -> tuple[Command, Command]:
        name = self.key(key)
        return ("SADD", name, *members), ("PEXPIRE", name, self._ms(ttl))

    async def sadd(self, key: str, *members: str, ttl: float) -> None:
        """``SADD`` then ``PEXPIRE``, in one pipelined round trip."""
        if not members:
            return
        name, px = self.key(key), self._ms(ttl)
        if self._detach:

            async def command(client: Client) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.sadd(name, *members)
                    pipe.pexpire(name, px)
                    await pipe.execute()

            await self._edge("sadd", command)
        else:
            await self._batched(*self._sadd_commands(key, members, ttl))

    async def smembers(self, key: str) -> frozenset[str]:
        name = self.key(key)
        values = await self._call("smembers", lambda redis: redis.smembers(name), ("SMEMBERS", name))
        return frozenset(value.decode() if isinstance(value, bytes) else value for value in values)

    async def incr(self, key: str) -> int:
        name = self.key(key)
        count = await self._call("incr", lambda redis: redis.incr(name), ("INCR", name))
        return int(count)

    # -- one pipeline per event-loop turn (one Redis) --------------------------------------

    async def _call(self, what: str, command: Callable[[Any], Any], raw: Command) -> Any:
        """One command: ``raw`` in this turn's batch on one Redis; on a Cluster, ``command``, the
        same call on redis-py's client API (which routes it to the node of its slot)."""
        if self._detach:
            return await self._edge(what, command)
        (reply,) = await self._batched(raw)
        return reply

    def _batched(self, *commands: Command) -> asyncio.Future[list[Any]]:
        """Queue ``commands`` (one request's, run in order) for this turn's batch (sent at once
        when it holds ``batch_entries`` requests' commands, else when the turn ends): a future of
        their replies, or of StoreUnavailable carrying the first error among them. A future, not
        a coroutine: awaited directly, it is one frame less for every await of the request."""
        batch = self._batch
        if batch:  # queued in this same turn: the loop is the one found for the first of them
            loop = self._batch_loop
            assert loop is not None
        else:  # the first of this turn: send once everyone runnable now has queued
            self._batch_loop = loop = asyncio.get_running_loop()  # (a getpid() call each, on Python 3.11)
            loop.call_soon(self._send_batch)
        future: asyncio.Future[list[Any]] = loop.create_future()
        batch.append((commands, future))
        if len(batch) >= self.batch_entries:  # full: sent now, and Redis works on it while this turn goes on
            self._send_batch()
        return future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:  # sent already, when it filled up
            return
        commands = [command for entry, _ in batch for command in entry]
        self._pipe.send(commands, lambda replies: self._settle(batch, commands, replies))

    def _settle(self, batch: Batch, commands: list[Command], replies: list[Any] | StoreUnavailable) -> None:
        """Give each queued entry its result: the replies to its commands, or the first error among them."""
        if isinstance(replies, StoreUnavailable):
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(replies)))
            return
        errors = [reply for reply in replies if isinstance(reply, Exception)]  # one look for the whole batch
        if errors and any(isinstance(error, NoScriptError) for error in errors):
            task = asyncio.get_running_loop().create_task(self._after_script_flush(batch, commands, replies))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            return
        begin = 0
        for entry, future in batch:
            end = begin + len(entry)
            if not future.done():  # else its request was cancelled meanwhile
                own = replies[begin:end]
                error = next((reply for reply in own if isinstance(reply, Exception)), None) if errors else None
                if error is not None:
                    future.set_exception(StoreUnavailable(f"redis: {type(error).__name__}: {error}"))
                else:
                    future.set_result(own)
            begin = end

    async def _after_script_flush(self, batch: Batch, commands: list[Command], replies: list[Any]) -> None:
        """A restarted or flushed Redis: load the scripts, and run again only what failed (the
        rest of the batch did run: an INCR or a take sent twice would count twice). A script's
        sha is that of its text, so the commands are sent again as they were."""
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        try:
            async with self._loading_scripts:  # batches that all found them gone load them one after another
                await self._edge("script load", self._load_scripts)  # (on one pooled connection, not one each)
            again = await self._sent_now([commands[i] for i in unknown])
        except StoreUnavailable as exc:
            self._settle(batch, commands, exc)
            return
        for i, reply in zip(unknown, again, strict=True):
            replies[i] = reply
        self._settle(batch, commands, replies)

    async def _load_scripts(self, client: Client) -> None:
        for script in self._scripts:
            await client.script_load(script)

    def _sent_now(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        """``commands`` on the pipe, on their own: a future of their replies (StoreUnavailable raised)."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(replies: list[Any] | StoreUnavailable) -> None:
            if future.done():
                return
            if isinstance(replies, StoreUnavailable):
                future.set_exception(replies)
            else:
                future.set_result(replies)

        self._pipe.send(commands, done)
        return future

    async def _checked_out(self, client: Client) -> AbstractConnection:
        """A connection of the client's pool for the pipe, kept out of the pool until it breaks."""
        assert isinstance(client, Redis), "one Redis only: a Cluster routes each command itself"
        return cast("AbstractConnection", await client.connection_pool.get_connection())  # type: ignore[no-untyped-call]

    async def _checked_in(self, connection: AbstractConnection) -> None:
        assert isinstance(self._client, Redis)
        await self._client.connection_pool.release(connection)

    async def ping(self) -> None:
        """Return when Redis answers. Until the client has started (its first connection; on a
        Cluster, reading the layout), this waits up to 5 s for that, which may outlast one call's
        timeout: ping once on startup, and the first requests need not pay for it."""
        if self._ready:
            await self._edge("ping", lambda client: client.ping())
        else:
            await self._edge("startup", lambda client: self._started_once(), seconds=_STARTUP_TIMEOUT)

    async def aclose(self) -> None:
        """Close the pool; never raises (it runs at cleanup, possibly with Redis gone)."""
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.wait({self._starting})
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self._pipe.aclose()
                if self._sending:
                    await asyncio.wait(self._sending)
                await self._client.aclose()

    async def _edge(self, what: str, command: Callable[[Client], Awaitable[T]], *, seconds: float = 0.0) -> T:
        """Run ``command`` within ``seconds`` (the timeout); any failure becomes StoreUnavailable.

        On a Cluster the call runs as a task of its own, abandoned (cancelled, not awaited) when
        time is up: redis-py's cleanup after a cancellation there may itself wait on a dead node.
        One Redis cleans up at once, and awaiting inline saves a trip around the event loop.
        """
        seconds = seconds or self._timeout
        call: asyncio.Future[T] | None = None
        try:
            async with asyncio.timeout(seconds):
                if self._detach:
                    call = asyncio.ensure_future(self._run(command))
                    return await asyncio.shield(call)
                return await self._run(command)
        except TimeoutError as exc:
            cause: BaseException = exc
            reason = f"no answer within {seconds * 1000:g}ms"
        except _ERRORS as exc:
            cause, reason = exc, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # redis-py can race itself into AttributeError while reconnecting a Cluster
            logger.warning("unexpected %s from the redis client in %s: %s", type(exc).__name__, what, exc)
            cause, reason = exc, f"{type(exc).__name__}: {exc}"
        finally:
            if call is not None and not call.done():  # timed out, or our caller was cancelled
                call.cancel()
                call.add_done_callback(_retrieve)
        raise StoreUnavailable(f"redis {what}: {reason}") from cause

    async def _run(self, command: Callable[[Client], Awaitable[T]]) -> T:
        if not self._ready:
            await self._started_once()
        return await command(self._client)

    async def _started_once(self) -> None:
        # redis-py wants initialize() awaited before a Cluster client is used concurrently (commands
        # racing its lazy first one fail). It runs once, as a task of its own, because it can take
        # longer than one call's timeout (a first connection, a Cluster's layout) and must not be
        # cut short by it: the calls that cannot wait fail, the next ones find it done.
        if self._ready:
            return
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
            self._starting.add_done_callback(self._started)
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        async with asyncio.timeout(max(_STARTUP_TIMEOUT, self._timeout)):
            await self._client.initialize()
            await self._client.ping()  # makes the first pooled connection(s)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting = None  # after a failure, the next call starts over
        self._ready = not task.cancelled() and task.exception() is None


def _bulks(*args: str | bytes | int) -> bytes:
    """``args`` as the bulk strings of a RESP command, without the array header: packed by hiredis."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed.partition(b"\r\n")[2]


def _take_tail(limit: int, period: float, spend: bool) -> bytes:
    """A take's arguments after its key, packed: ``<interval> <limit> <spend>``."""
    return _bulks(interval_us(limit, period), limit, int(spend))


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, rounded up, at least 1. Remembered by each store
    (``RedisStore._ms``): the arithmetic costs 3.5k instructions, two or three times a miss."""
    return max(1, -(-round(seconds * 1_000_000) // 1000))


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # an abandoned call's error is not "never retrieved"


def _cluster_from_url(url: str, *, timeout: float, retry: Retry) -> RedisCluster:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or "]" in port:  # no port given (an IPv6 address has colons of its own)
            host, port = item.strip(), "6379"
        nodes.append(ClusterNode(host.strip("[]") or "localhost", int(port)))
    client = RedisCluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.lower().startswith("rediss"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=retry,
    )
    client.commands_parser = _CommandTable()
    return client


class _CommandTable(AsyncCommandsParser):
    """Reads the ``COMMAND`` table once. redis-py re-initialises a Cluster client after any
    connection error and would read it again each time: ~100 ms of pure-Python parsing that
    blocks the event loop, for every request that meets a node which is down."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node  # the node to ask COMMAND GETKEYS: keep it current
        if not self.commands:
            await super().initialize(node)
