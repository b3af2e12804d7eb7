"""Choosing an upstream: round robin over the healthy ones, with a circuit breaker (DESIGN §5).

An upstream that fails ``failures`` connections in a row is taken out for ``cooldown``
seconds; after that one request may try it again (half-open): a success puts it back, a
failure takes it out for another cooldown. Only connection failures count: an upstream
that answers 500 is up, and its answer is the client's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from yarl import URL

from middleware.problem import Problem

from .config import BreakerConfig
from .routing import Target
from .upstream_http import ConnectionPool

__all__ = ("Upstream", "UpstreamPool")

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Upstream:
    """One upstream base URL (scheme, host, port and path prefix, no trailing slash), its
    keep-alive connections and its health."""

    url: URL
    base: str  # str(url) precomputed: the request path is appended to it
    connections: ConnectionPool
    prefix: str = ""  # the URL's path prefix ("/v1"), "" when it has none
    failures: int = 0  # consecutive connection failures
    open_until: float = 0.0  # monotonic time until which it is out of rotation

    @classmethod
    def at(cls, url: URL) -> Upstream:
        return cls(url, str(url), ConnectionPool(url.origin()), prefix=url.raw_path.rstrip("/"))

    @property
    def label(self) -> str:
        return self.base

    def path_for(self, target: Target) -> str:
        """The request target sent upstream: the path prefix, the path below the service
        (``/`` when both are empty) and the query exactly as the client sent it."""
        path = self.prefix + target.rest or "/"
        return path if target.query is None else f"{path}?{target.query}"

    def url_for(self, target: Target) -> URL:
        """The upstream URL of a matched request: the base (with its path prefix), the path
        below the service, and the query exactly as the client sent it."""
        url = self.base + target.rest
        if not target.rest and "/" not in self.base[self.base.index("//") + 2 :]:
            url += "/"
        if target.query is not None:
            url += "?" + target.query
        return URL(url, encoded=True)


class UpstreamPool:
    """The upstreams of one service; shared by all its routes, kept across requests."""

    def __init__(
        self,
        service: str,
        urls: Sequence[URL],
        breaker: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.upstreams = tuple(Upstream.at(url) for url in urls)
        self._breaker = breaker
        self._clock = clock
        self._next = 0

    def pick(self, exclude: Sequence[Upstream] = ()) -> Upstream | None:
        """The next healthy upstream in rotation not in ``exclude``, or None when there is none."""
        now = self._clock()
        count = len(self.upstreams)
        for offset in range(count):
            upstream = self.upstreams[(self._next + offset) % count]
            if upstream.open_until <= now and upstream not in exclude:
                self._next = (self._next + offset + 1) % count
                return upstream
        return None

    def choose(self, tried: list[Upstream], failure: str | None = None) -> Upstream:
        """The next upstream for a request that already tried ``tried`` (it is added there).

        Raises Problem 503 when no upstream is healthy, 502 when every healthy one was tried
        (``failure``, what the last attempt met, ends its detail).
        """
        upstream = self.pick(tried)
        if upstream is None:
            if tried:
                last = f"; the last: {failure}" if failure else ""
                raise Problem(502, f"no upstream of {self.service} could be reached{last}")
            raise Problem(503, f"no healthy upstream for {self.service}")
        tried.append(upstream)
        return upstream

    def close(self) -> None:
        """Close every upstream's keep-alive connections (busy ones once their response is done)."""
        for upstream in self.upstreams:
            upstream.connections.close()

    def healthy(self, upstream: Upstream) -> bool:
        return upstream.open_until <= self._clock()

    def succeeded(self, upstream: Upstream) -> None:
        if upstream.failures:
            if upstream.failures >= self._breaker.failures:
                logger.info("upstream %s of %s is back", upstream.label, self.service)
            upstream.failures = 0
            upstream.open_until = 0.0

    def failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        if upstream.failures >= self._breaker.failures:
            upstream.open_until = self._clock() + self._breaker.cooldown
            logger.warning(
                "upstream %s of %s taken out for %gs after %d connection failures",
                upstream.label, self.service, self._breaker.cooldown, upstream.failures,
            )  # fmt: skip
