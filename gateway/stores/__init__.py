"""The stores behind rate limiting and caching (DESIGN §9): :func:`open_store` picks one by URL.

The :class:`~middleware.base.Store` protocol itself is declared by its consumers, in
``middleware/base.py``. Opening a store does no I/O: call ``ping()`` on startup to find out
whether it answers, and ``aclose()`` on cleanup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore

if TYPE_CHECKING:
    from gateway.config import StoreConfig
    from middleware.base import Store

__all__ = ("SCHEMES", "MemoryStore", "RedisStore", "open_store")

SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def open_store(config: StoreConfig, *, namespace: str = "gw:") -> Store:
    """The store for ``config.url``: ``memory://`` (bounded by ``config.max_memory``),
    ``redis://``/``rediss://``/``unix://`` (one Redis) or ``redis+cluster://h1:p1,h2:p2``
    (a Redis Cluster). Redis calls are bounded by ``config.timeout`` seconds; keys are
    prefixed with ``namespace``."""
    scheme, separator, _ = config.url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        # the URL itself may carry a password: name only its scheme
        raise ValueError(f"unsupported store url scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if scheme == "memory":
        return MemoryStore(config.max_memory)
    return RedisStore.from_url(config.url, namespace=namespace, timeout=config.timeout)
