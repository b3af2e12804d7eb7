"""The in-process store, ``memory://`` (DESIGN §9): the default, so nothing else is needed to run.

A least-recently-used map bounded by bytes, with per-key TTLs and the same GCRA as the Redis
script (:mod:`gateway.stores.gcra`). Every method finishes without awaiting anything, so each
one is atomic on the event loop. It is per process: several workers or gateways each count
on their own; share a Redis for limits that hold across them.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.stores.gcra import decide, interval_us
from middleware.base import AddToSet, Change, Put, Quota

__all__ = ("ENTRY_OVERHEAD", "SET_MEMBER_OVERHEAD", "MemoryStore")

ENTRY_OVERHEAD = 96  # bytes counted per entry on top of key and value: the map's own bookkeeping
SET_MEMBER_OVERHEAD = 64  # bytes counted per set member on top of its length


@dataclass(slots=True)
class _Entry:
    value: bytes  # b"" for a set
    expires: float  # clock() time after which the entry is gone; math.inf: never
    size: int
    members: set[str] | None = None  # a set's members (sadd/smembers)


class MemoryStore:
    """A :class:`~middleware.base.Store` in this process's memory.

    ``max_bytes`` bounds the sum of key lengths, value lengths and :data:`ENTRY_OVERHEAD` per
    entry; storing beyond it evicts the least recently used entries (a read counts as a use), and
    a value larger than the whole bound is not stored. Expired entries disappear when next
    touched or when evicted. ``clock`` (seconds, monotonic) is injected so tests need not sleep.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    async def take(self, key: str, *, limit: int, period: float, spend: bool = True) -> Quota:
        interval = interval_us(limit, period)
        now = self._clock()
        entry = self._lookup(key, now)
        tat = int(entry.value) if entry is not None and entry.value.isdigit() else None  # as Lua's tonumber
        decision = decide(round(now * 1_000_000), tat, interval, limit)
        if spend and decision.tat is not None:
            self._store(key, b"%d" % decision.tat, now + decision.ttl_ms / 1000)
        return decision.quota()

    async def get(self, key: str) -> bytes | None:
        entry = self._lookup(key, self._clock())
        return None if entry is None else entry.value

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds; a ``ttl`` of zero or less deletes the key."""
        self._set(key, value, ttl)

    async def delete(self, *keys: str) -> int:
        return self._delete(keys)

    def _set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0:
            self._remove(key)
        else:
            self._store(key, bytes(value), self._clock() + ttl)

    def _delete(self, keys: tuple[str, ...]) -> int:
        now = self._clock()
        found = 0
        for key in keys:
            found += self._lookup(key, now) is not None
            self._remove(key)
        return found

    async def add(self, key: str, value: bytes, *, ttl: float) -> bool:
        return self._add(key, value, ttl)

    def _add(self, key: str, value: bytes, ttl: float) -> bool:
        now = self._clock()
        if ttl <= 0 or self._lookup(key, now) is not None:
            return False
        self._store(key, bytes(value), now + ttl)
        return key in self._entries

    async def get_many(self, *keys: str) -> list[bytes | None]:
        return self.get_many_now(*keys)

    async def add_and_get(self, key: str, value: bytes, *, ttl: float, then: str) -> tuple[bool, bytes | None]:
        added = self._add(key, value, ttl)
        entry = self._lookup(then, self._clock())
        return added, None if entry is None else entry.value

    async def get_many_or_add(self, *keys: str, add: str, value: bytes, ttl: float) -> tuple[list[bytes | None], bool]:
        values = self.get_many_now(*keys)
        return values, values[-1] is None and self._add(add, value, ttl)

    async def write(self, *changes: Change) -> None:
        for change in changes:  # the same steps as set, sadd and delete, without a coroutine each
            if isinstance(change, Put):
                self._set(change.key, change.value, change.ttl)
            elif isinstance(change, AddToSet):
                self._sadd(change.key, change.members, change.ttl)
            else:
                self._delete(change.keys)

    def get_many_now(self, *keys: str) -> list[bytes | None]:
        """``get_many`` without a coroutine (:class:`~middleware.base.ReadsNow`): the cache's hit lane."""
        now = self._clock()
        values: list[bytes | None] = []
        for key in keys:  # a loop, not a comprehension: a hit reads one to three keys at a time
            entry = self._lookup(key, now)
            values.append(None if entry is None else entry.value)
        return values

    async def sadd(self, key: str, *members: str, ttl: float) -> None:
        """Each member counts its length plus :data:`SET_MEMBER_OVERHEAD` bytes against the bound."""
        self._sadd(key, members, ttl)

    def _sadd(self, key: str, members: tuple[str, ...], ttl: float) -> None:
        now = self._clock()
        entry = self._lookup(key, now)
        if entry is None or entry.members is None:
            self._remove(key)
            entry = _Entry(b"", now + ttl, len(key) + ENTRY_OVERHEAD, set())
            self._entries[key] = entry
            self._used += entry.size
        current = entry.members if entry.members is not None else set()
        for member in members:
            if member not in current:
                current.add(member)
                entry.size += len(member) + SET_MEMBER_OVERHEAD
                self._used += len(member) + SET_MEMBER_OVERHEAD
        entry.expires = now + ttl
        if entry.size > self.max_bytes:
            self._remove(key)
        self._evict()

    async def smembers(self, key: str) -> frozenset[str]:
        entry = self._lookup(key, self._clock())
        return frozenset() if entry is None or entry.members is None else frozenset(entry.members)

    async def incr(self, key: str) -> int:
        entry = self._lookup(key, self._clock())
        count = 1 if entry is None else int(entry.value) + 1  # like Redis INCR, keeps the TTL
        self._store(key, b"%d" % count, math.inf if entry is None else entry.expires)
        return count

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()
        self._used = 0

    def _lookup(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, key: str, value: bytes, expires: float) -> None:
        self._remove(key)
        size = len(key) + len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = _Entry(value, expires, size)
        self._used += size
        self._evict()

    def _evict(self) -> None:
        while self._used > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._used -= evicted.size

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= entry.size
