"""The Redis store (DESIGN §9): one Redis, or a Redis Cluster, shared by every gateway instance.

One client (and so one connection pool) per store, which the app opens once per process.
Every call is bounded by ``timeout`` (the socket timeouts and an ``asyncio.timeout`` around the
whole call, retries included), and redis-py's errors are translated in one place, :func:`_edge`,
into :class:`~middleware.base.StoreUnavailable`. A broken connection is dropped by redis-py and
a new one is made on the next call, so the store recovers by itself when Redis comes back.

``take`` is one ``EVALSHA`` of :data:`gateway.stores.gcra.LUA` (loaded again automatically
after a Redis restart), with the time taken from the Redis server so that instances agree.
Keys are ``<namespace>{<key>}``: the braces are a Cluster hash tag, so a key's slot depends on
the caller's key alone, and a caller may put its own ``{tag}`` in a key to keep keys together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.stores.gcra import LUA, interval_us, quota
from middleware.base import Quota, StoreUnavailable

__all__ = ("RedisStore",)

# RedisError covers ConnectionError, TimeoutError, ClusterDownError, TryAgainError, ReadOnlyError
# (failover) and BusyLoadingError; RedisClusterException covers SlotNotCoveredError and friends.
# OSError and TimeoutError: raised by sockets and by asyncio.timeout below.
_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


@contextlib.asynccontextmanager
async def _edge(what: str, seconds: float) -> AsyncIterator[None]:
    """Bound one store call by ``seconds`` and turn any failure into StoreUnavailable."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise StoreUnavailable(f"redis {what}: no answer within {seconds * 1000:g}ms") from exc
    except _ERRORS as exc:
        raise StoreUnavailable(f"redis {what}: {type(exc).__name__}: {exc}") from exc


class RedisStore:
    """A :class:`~middleware.base.Store` on Redis or Redis Cluster; see :func:`gateway.stores.open_store`.

    Nothing connects until the first call.
    """

    def __init__(self, client: Redis | RedisCluster, *, namespace: str = "gw:", timeout: float = 0.05) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must not contain braces (a Cluster hash tag): {namespace!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._client = client
        self._namespace = namespace
        self._timeout = timeout
        self._gcra = client.register_script(LUA)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "gw:", timeout: float = 0.05) -> RedisStore:
        """``redis://``, ``rediss://`` or ``unix://`` for one Redis; ``redis+cluster://h1:p1,h2:p2``
        (or ``rediss+cluster://``, TLS) for a Cluster, given any of its nodes."""
        retry = Retry(NoBackoff(), 1)  # once, on a fresh connection: a pooled one may be stale
        client: Redis | RedisCluster
        if url.partition("://")[0].lower() in ("redis+cluster", "rediss+cluster"):
            client = _cluster_from_url(url, timeout=timeout, retry=retry)
        else:
            client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry)
        return cls(client, namespace=namespace, timeout=timeout)

    def key(self, key: str) -> str:
        """The Redis key that holds ``key``: namespaced, with a hash tag unless it carries one."""
        start = key.find("{")
        if start != -1 and key.find("}", start + 1) > start + 1:
            return self._namespace + key
        return f"{self._namespace}{{{key}}}"

    async def take(self, key: str, *, limit: int, period: float) -> Quota:
        return await self._take(key, limit, period)

    async def _take(self, key: str, limit: int, period: float, *now_us: int) -> Quota:
        # now_us: tests only, to replay a sequence of times against the Python arithmetic
        interval = interval_us(limit, period)
        async with _edge("take", self._timeout):
            result = await self._gcra(keys=[self.key(key)], args=[interval, limit, *now_us])
        allowed, remaining, reset_us, retry_us = result
        return quota(allowed, remaining, reset_us, retry_us)

    async def get(self, key: str) -> bytes | None:
        async with _edge("get", self._timeout):
            value = await self._client.get(self.key(key))
        return cast("bytes | None", value)  # responses are not decoded

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds (rounded up to whole ms); zero or less deletes it."""
        if ttl <= 0:
            await self.delete(key)
            return
        async with _edge("set", self._timeout):
            await self._client.set(self.key(key), value, px=max(1, -(-round(ttl * 1_000_000) // 1000)))

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        async with _edge("delete", self._timeout):
            await self._client.delete(*(self.key(key) for key in keys))  # split by slot on a Cluster

    async def incr(self, key: str) -> int:
        async with _edge("incr", self._timeout):
            count: int = await self._client.incr(self.key(key))
        return count

    async def ping(self) -> None:
        async with _edge("ping", self._timeout):
            await self._client.ping()

    async def aclose(self) -> None:
        """Close the pool; never raises (it runs at cleanup, possibly with Redis gone)."""
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self._client.aclose()


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
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.lower().startswith("rediss"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=retry,
    )
