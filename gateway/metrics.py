"""Prometheus metrics, owned by the app (DESIGN §8): no global registry.

:class:`Metrics` holds one ``CollectorRegistry`` per app. :meth:`Metrics.observe` is the
``observe`` hook of :class:`~middleware.request_id.RequestIdMiddleware`: it reads the same
:class:`~middleware.base.Outcome` the access-log line is written from. Gauges that describe
state rather than events (upstream health, open WebSockets) are refreshed from the live
objects once a second and again just before each scrape. Two gauges describe the process
itself, for soak runs and alerts: ``gateway_asyncio_tasks`` (tasks alive) and
``gateway_event_loop_lag_seconds`` (how late the once-a-second refresh timer ran, the worst
over the last ``LAG_WINDOW`` ticks: a loop blocked by CPU-bound work shows up here).

Requests are tallied in plain ints (:class:`Tally`) and added to the Prometheus series at
each refresh: once a second and before every scrape. A prometheus-client increment takes a
lock (and, under ``--workers``, writes to a memory-mapped file), and a histogram observation
walks the bucket list; per request that was about 3% of a proxied request's CPU. A scrape
of this process is always exact; under ``--workers`` another worker's counts are at most
``REFRESH_EVERY`` behind.

Under ``--workers N`` the supervisor makes a temporary directory and every worker writes
its samples there (prometheus-client's multiprocess mode, see :func:`enable_multiprocess`);
whichever worker answers a scrape reports the sum over all of them. Gauges of state use
``livemin`` (an upstream is reported healthy only when no live worker has taken it out) and
``livesum`` (open WebSockets in all live workers).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.samples import Sample

from middleware.base import Outcome

__all__ = (
    "BUCKETS",
    "CONTENT_TYPE",
    "METRICS",
    "Metrics",
    "Snapshot",
    "enable_multiprocess",
    "forget_process",
    "quantile",
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_UPSTREAM_ERRORS = frozenset({499, 502, 503, 504})
NO_SERVICE = "-"  # the service label of a request no service claimed (404s, bad paths)
REFRESH_EVERY = 1.0  # seconds between refreshes of the state gauges
LAG_WINDOW = 10  # refresh ticks the event-loop lag gauge reports the worst of


def enable_multiprocess(directory: str) -> None:
    """Make metrics created from now on in this process write to ``directory`` (call in a forked
    worker before :class:`Metrics` is built). prometheus-client picks its value class when it is
    imported, from ``PROMETHEUS_MULTIPROC_DIR``; a worker forked after that import switches here."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def forget_process(directory: str, pid: int) -> None:
    """The supervisor's bookkeeping when worker ``pid`` exits: drop its live gauges."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


@dataclass(slots=True)
class Snapshot:
    """Every sample of one scrape, by sample name (``gateway_requests_total``, ``…_bucket``)."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples.get(name, ()) if _has(s, labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        result: dict[str, float] = {}
        for sample in self.samples.get(name, ()):
            if _has(sample, labels) and label in sample.labels:
                result[sample.labels[label]] = result.get(sample.labels[label], 0.0) + sample.value
        return result


def _has(sample: Sample, labels: Mapping[str, str]) -> bool:
    return all(sample.labels.get(k) == v for k, v in labels.items())


class Tally:
    """Requests counted since the last fold, in plain ints (the per-request half of :class:`Metrics`)."""

    __slots__ = ("cache", "durations", "ratelimit_rejected", "requests", "upstream_errors")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (service, method, status)
        self.durations: dict[str, list[float]] = {}  # service: count per bucket (+Inf last), then the sum
        self.cache: dict[str, int] = {}  # X-Cache value
        self.upstream_errors: dict[str, int] = {}  # service
        self.ratelimit_rejected: dict[str, int] = {}  # service

    def count(self, service: str, method: str, status: int, seconds: float, cache: str | None, failed: bool) -> None:
        key = (service, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get(service)
        if histogram is None:
            histogram = self.durations[service] = [0.0] * (len(BUCKETS) + 2)
        histogram[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds
        histogram[-1] += seconds
        if cache is not None:
            self.cache[cache] = self.cache.get(cache, 0) + 1
        if failed:
            self.upstream_errors[service] = self.upstream_errors.get(service, 0) + 1
        if status == 429:
            self.ratelimit_rejected[service] = self.ratelimit_rejected.get(service, 0) + 1


class Metrics:
    """The §8 series. ``multiprocess_dir`` set: samples go to that directory and a scrape
    aggregates over every worker writing there."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._dir = multiprocess_dir
        if multiprocess_dir is None:
            self._exposed = self.registry
        else:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, multiprocess_dir)  # type: ignore[no-untyped-call]
        r = self.registry
        self._tally = Tally()
        self.requests = Counter("gateway_requests", "Requests answered", ["service", "method", "status"], registry=r)
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the response", ["service"],
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Requests that failed at the upstream (502, 503, 504, broken off)",
            ["service"], registry=r,
        )  # fmt: skip
        self.cache = Counter("gateway_cache", "Cache decisions (X-Cache)", ["result"], registry=r)
        self.ratelimit_rejected = Counter(
            "gateway_ratelimit_rejected", "Requests refused with 429", ["service"], registry=r
        )
        self.websockets = Gauge(
            "gateway_websocket_connections", "Open WebSocket relays", registry=r, multiprocess_mode="livesum"
        )
        self.upstream_healthy = Gauge(
            "gateway_upstream_healthy", "1 when the upstream is in rotation, 0 while its circuit breaker is open",
            ["service", "upstream"], registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.reloads = Counter("gateway_config_reloads", "Config reloads by result", ["result"], registry=r)
        self.tasks = Gauge(
            "gateway_asyncio_tasks", "asyncio tasks alive in the process", registry=r, multiprocess_mode="livesum"
        )
        self.loop_lag = Gauge(
            "gateway_event_loop_lag_seconds", "How late the event loop ran a timer, worst of the last ticks",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self._lags: collections.deque[float] = collections.deque(maxlen=LAG_WINDOW)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        self._sources: list[Callable[[Metrics], None]] = []
        self._health_labels: set[tuple[str, str]] = set()

    def observe(self, method: str, outcome: Outcome, status: int, seconds: float) -> None:
        """Count one finished request (the access-log hook); the series see it at the next refresh."""
        service = outcome.service or NO_SERVICE
        method = method if method in _METHODS else "OTHER"
        failed = outcome.service is not None and outcome.error is not None and status in _UPSTREAM_ERRORS
        self._tally.count(service, method, status, seconds, outcome.cache, failed)

    def fold(self) -> None:
        """Add the requests tallied since the last fold to the Prometheus series."""
        tally, self._tally = self._tally, Tally()
        for (service, method, status), n in tally.requests.items():
            self.requests.labels(service, method, str(status)).inc(n)
        for service, counts in tally.durations.items():
            # prometheus-client has no public "add n observations to bucket i"; its Histogram
            # child keeps one value per bucket (non-cumulative, +Inf last) and the sum
            child = self.duration.labels(service)
            for value, observed in zip(child._buckets, counts[:-1], strict=True):
                if observed:
                    value.inc(observed)
            child._sum.inc(counts[-1])
        for result, n in tally.cache.items():
            self.cache.labels(result.lower()).inc(n)
        for service, n in tally.upstream_errors.items():
            self.upstream_errors.labels(service=service).inc(n)
        for service, n in tally.ratelimit_rejected.items():
            self.ratelimit_rejected.labels(service=service).inc(n)

    def add_source(self, source: Callable[[Metrics], None]) -> None:
        """Register a callable that sets state gauges from live objects (run before each scrape)."""
        self._sources.append(source)

    def set_upstream_health(self, health: Iterable[tuple[str, str, bool]]) -> None:
        """Set ``gateway_upstream_healthy`` to exactly ``(service, upstream, healthy)``; series of
        upstreams no longer configured are removed."""
        seen = set()
        for service, upstream, healthy in health:
            seen.add((service, upstream))
            self.upstream_healthy.labels(service=service, upstream=upstream).set(1 if healthy else 0)
        for gone in self._health_labels - seen:
            with contextlib.suppress(KeyError):
                self.upstream_healthy.remove(*gone)
        self._health_labels = seen

    def refresh(self) -> None:
        self.fold()
        for source in self._sources:
            source(self)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to count
            self.tasks.set(len(asyncio.all_tasks()))

    def exposition(self) -> bytes:
        self.refresh()
        return generate_latest(self._exposed)

    def snapshot(self) -> Snapshot:
        self.refresh()
        snapshot = Snapshot()
        for family in self._exposed.collect():
            for sample in family.samples:
                snapshot.samples.setdefault(sample.name, []).append(sample)
        return snapshot

    async def refresher(self, every: float = REFRESH_EVERY) -> None:
        """Refresh the state gauges forever (in multiprocess mode other workers read them from disk),
        measuring on the way how late each tick runs (the event-loop lag)."""
        loop = asyncio.get_running_loop()
        while True:
            self.refresh()
            due = loop.time() + every
            await asyncio.sleep(every)
            self._lags.append(max(0.0, loop.time() - due))
            self.loop_lag.set(max(self._lags))


METRICS = web.AppKey("metrics", Metrics)


async def refresh_in_background(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: keep the state gauges current while the app runs; on the way out, fold the
    last tally (under ``--workers`` a worker that exits leaves its final counts in the files)."""
    task = asyncio.create_task(app[METRICS].refresher())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    app[METRICS].fold()


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile``: the ``q`` quantile from cumulative bucket counts (upper bound → count)."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width > 0 else 0.0)
        lower, below = bound, count
    return lower
