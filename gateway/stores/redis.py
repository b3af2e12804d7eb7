"""The Redis store (DESIGN §9): one Redis, or a Redis Cluster, shared by every gateway instance.

One client (and so one connection pool) per store, which the app opens once per process.
Every call goes through :meth:`RedisStore._edge`, the one place that bounds it by ``timeout``
(retries and reconnects included) and translates whatever redis-py raises into
:class:`~middleware.base.StoreUnavailable`. A broken connection is dropped
by redis-py and a new one made on the next call, so the store recovers when Redis comes back.

``take`` is one ``EVALSHA`` of :data:`gateway.stores.gcra.LUA` (loaded again automatically
after a Redis restart), with the time taken from the Redis server so that instances agree.
On one Redis, the commands that requests start in the same turn of the event loop (takes,
cache lookups, stores, locks) go out together in one pipeline: one round trip and one
connection for all of them. redis-py's cost per call (a pooled connection taken and given
back, a round trip awaited) is most of what a command costs the gateway in CPU, so this
"auto-pipelining" (ioredis has it too) is what keeps a busy gateway's Redis bill low. Each
command is still its own atomic step; one request's commands still run in its order.
The batch is written on a pooled redis-py connection as raw commands and its replies read
back one by one, without redis-py's ``Pipeline`` (its per-command bookkeeping, reply
callbacks and per-call instrumentation were about half of what a Redis command cost the
gateway), packed by hiredis; connecting, AUTH, TLS, SELECT and reading replies (with
hiredis's parser) are still redis-py's.
Keys are ``<namespace>{<key>}``. The braces are a Cluster hash tag: the slot depends on the
caller's key up to its first ``}`` (all of it when it has none), never on the namespace, so
``c:{users}:gen`` and ``c:{users}:e:1`` share a slot, for a future script over both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis._parsers.commands import AsyncCommandsParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.stores.gcra import LUA, interval_us, quota
from middleware.base import Quota, StoreUnavailable

__all__ = ("RedisStore",)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Client = Redis | RedisCluster
Command = tuple[str | bytes | int | float, ...]  # one raw command: name and arguments
Batch = list[tuple[tuple[Command, ...], "asyncio.Future[Any]"]]  # each request's commands, and who waits for them

# RedisError covers ConnectionError, TimeoutError, ClusterDownError, TryAgainError, ReadOnlyError
# (failover) and BusyLoadingError; RedisClusterException covers SlotNotCoveredError and friends.
_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
_STARTUP_TIMEOUT = 5.0  # seconds the client's one-time initialisation may take, whatever the call timeout


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
        self._detach = isinstance(client, RedisCluster)
        self._ready = False
        self._starting: asyncio.Task[None] | None = None
        self._batch: Batch = []  # commands waiting to be sent (one Redis)
        self._sending: set[asyncio.Task[None]] = set()

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

    async def take(self, key: str, *, limit: int, period: float, spend: bool = True) -> Quota:
        return await self._take(key, limit, period, spend=spend)

    async def _take(self, key: str, limit: int, period: float, *now_us: int, spend: bool = True) -> Quota:
        # now_us: tests only, to replay a sequence of times against the Python arithmetic
        keys, args = [self.key(key)], [interval_us(limit, period), limit, 1 if spend else 0, *now_us]
        if self._detach or now_us:
            result = await self._edge("take", lambda client: self._gcra(keys=keys, args=args, client=client))
        else:
            result = await self._batched(("EVALSHA", self._gcra.sha, 1, keys[0], *args))
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
        name, px = self.key(key), _ms(ttl)
        await self._call("set", lambda redis: redis.set(name, value, px=px), ("SET", name, value, "PX", px))

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
        name, px = self.key(key), _ms(ttl)
        stored = await self._call(
            "add", lambda redis: redis.set(name, value, px=px, nx=True), ("SET", name, value, "PX", px, "NX")
        )
        return bool(stored)

    async def get_many(self, *keys: str) -> list[bytes | None]:
        if not keys:
            return []
        names = [self.key(key) for key in keys]
        if self._detach:  # one MGET per slot; one round trip when the keys share a hash tag
            values = await self._edge("get_many", lambda client: client.mget_nonatomic(names))  # type: ignore[union-attr]
        else:
            values = await self._batched(("MGET", *names))
        return cast("list[bytes | None]", values)

    async def sadd(self, key: str, *members: str, ttl: float) -> None:
        """``SADD`` then ``PEXPIRE``, in one pipelined round trip."""
        if not members:
            return
        name, px = self.key(key), _ms(ttl)
        if self._detach:

            async def command(client: Client) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.sadd(name, *members)
                    pipe.pexpire(name, px)
                    await pipe.execute()

            await self._edge("sadd", command)
        else:
            await self._batched(("SADD", name, *members), ("PEXPIRE", name, px))

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
        return await self._batched(raw)

    async def _batched(self, *commands: Command) -> Any:
        """Queue ``commands`` (one request's, run in order) for this turn's batch; the reply to
        the last one, or StoreUnavailable carrying the first error among them."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._batch.append((commands, future))
        if len(self._batch) == 1:  # the first of this turn: send once everyone runnable now has queued
            loop.call_soon(self._send_batch)
        return await future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: Batch) -> None:
        try:
            results = await self._edge("pipeline", lambda client: self._pipelined(client, batch))
        except StoreUnavailable as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(exc)))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(StoreUnavailable(f"redis: {type(result).__name__}: {result}"))
            else:
                future.set_result(result)

    async def _pipelined(self, client: Client, batch: Batch) -> list[Any]:
        """Each queued entry's result: the reply to its last command, or the first error among its commands."""
        commands = [command for entry, _ in batch for command in entry]
        replies = await self._exchange(client, commands)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:  # a restarted or flushed Redis: load the script, and run again only what failed
            # (the rest of the batch did run: an INCR or a take sent twice would count twice)
            self._gcra.sha = await client.script_load(LUA)
            again = await self._exchange(client, [_with_sha(commands[i], self._gcra.sha) for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        results, begin = [], 0
        for entry, _ in batch:
            end = begin + len(entry)
            errors = [reply for reply in replies[begin:end] if isinstance(reply, Exception)]
            results.append(errors[0] if errors else replies[end - 1])
            begin = end
        return results

    async def _exchange(self, client: Client, commands: list[Command]) -> list[Any]:
        """Write ``commands`` in one go on a pooled connection and read every reply (an error
        reply is returned, not raised). Like redis-py's pipeline: once more on a fresh connection
        when the pooled one turns out to be broken (Redis restarted, an idle timeout)."""
        assert isinstance(client, Redis), "one Redis only: a Cluster routes each command itself"
        pool = client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                return await _round_trip(connection, commands)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await connection.disconnect()
                return await _round_trip(connection, commands)
        except BaseException:
            # cut short (a timeout, a cancelled request) or failed: replies may still be on their
            # way, so the connection cannot go back to the pool as it is
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)

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


async def _round_trip(connection: AbstractConnection, commands: list[Command]) -> list[Any]:
    packed = b"".join([hiredis.pack_command(command) for command in commands])  # type: ignore[arg-type]
    await connection.send_packed_command(packed, check_health=False)
    parser = connection._parser
    replies: list[Any] = []
    if not isinstance(parser, _AsyncHiredisParser):  # not redis-py's default with hiredis installed
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    # The replies straight from the connection's hiredis reader: what connection.read_response()
    # does for each, less its per-reply wrapping (a third of a Redis command's cost, measured).
    # An error reply comes as a ResponseError value; a connection error is raised, as there.
    reader = cast("hiredis.Reader", parser._reader)  # set when the connection connected (send above)
    for _ in commands:
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            await parser.read_from_socket()  # type: ignore[no-untyped-call]
            reply = reader.gets()
        if isinstance(reply, RedisConnectionError):  # e.g. LOADING: a Redis that is starting
            raise reply
        replies.append(reply)
    return replies


def _with_sha(command: Command, sha: str) -> Command:
    return (command[0], sha, *command[2:]) if command[0] == "EVALSHA" else command


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, rounded up, at least 1."""
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
