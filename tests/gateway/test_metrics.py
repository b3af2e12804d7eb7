"""gateway.metrics: the §8 series counted from real requests through a real gateway app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import ROUTES
from gateway.metrics import METRICS, Metrics, quantile, refresh_in_background
from middleware.base import Outcome
from tests.conftest import MakeGateway, upstream

YAML = """
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
    rate_limit: {{requests: 2, per: 1m}}
  dead:
    upstreams: ["http://127.0.0.1:1"]
    retries: 0
    circuit_breaker: {{failures: 1, cooldown: 1m}}
"""


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, parsed back by prometheus-client's own parser."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_requests_statuses_durations_and_429s_are_counted(make_gateway: MakeGateway, backend: TestServer) -> None:
    gateway = await make_gateway(YAML, upstream=upstream(backend))
    for _ in range(3):
        await gateway.get("/api/svc/echo/x")
    await gateway.get("/api/nowhere/x")
    seen = samples(gateway.app[METRICS])
    requests = "gateway_requests_total"
    assert seen[(requests, frozenset({("service", "svc"), ("method", "GET"), ("status", "200")}))] == 2
    assert seen[(requests, frozenset({("service", "svc"), ("method", "GET"), ("status", "429")}))] == 1
    assert seen[(requests, frozenset({("service", "-"), ("method", "GET"), ("status", "404")}))] == 1
    assert seen[("gateway_ratelimit_rejected_total", frozenset({("service", "svc")}))] == 1
    assert seen[("gateway_request_duration_seconds_count", frozenset({("service", "svc")}))] == 3
    assert seen[("gateway_websocket_connections", frozenset())] == 0


async def test_upstream_errors_and_health_follow_the_circuit_breaker(
    make_gateway: MakeGateway, backend: TestServer
) -> None:
    gateway = await make_gateway(YAML, upstream=upstream(backend))
    dead = ("service", "dead"), ("upstream", "http://127.0.0.1:1")
    assert samples(gateway.app[METRICS])[("gateway_upstream_healthy", frozenset(dead))] == 1
    assert (await gateway.get("/api/dead/x")).status == 502
    assert (await gateway.get("/api/dead/x")).status == 503  # breaker open after one failure
    seen = samples(gateway.app[METRICS])
    assert seen[("gateway_upstream_errors_total", frozenset({("service", "dead")}))] == 2
    assert seen[("gateway_upstream_healthy", frozenset(dead))] == 0
    live = ("service", "svc"), ("upstream", upstream(backend))
    assert seen[("gateway_upstream_healthy", frozenset(live))] == 1


async def test_health_series_of_removed_upstreams_disappear(make_gateway: MakeGateway, backend: TestServer) -> None:
    gateway = await make_gateway(YAML, upstream=upstream(backend))
    metrics = gateway.app[METRICS]
    metrics.refresh()
    gateway.app[ROUTES].pools.pop("dead")
    assert not any(labels and ("service", "dead") in labels for _, labels in samples(metrics))


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()  # a global registry would refuse the second set of names
    one.reloads.labels(result="success").inc()
    assert two.snapshot().total("gateway_config_reloads_total") == 0
    assert one.snapshot().total("gateway_config_reloads_total", result="success") == 1


def test_tallied_durations_land_in_the_buckets_histogram_observe_would_use() -> None:
    tallied, observed = Metrics(), Metrics()
    outcome = Outcome(service="svc")
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 45.0):  # 0.001 is a bound: it counts in that bucket
        tallied.observe("GET", outcome, 200, seconds)
        observed.duration.labels("svc").observe(seconds)
    reference = observed.snapshot().samples["gateway_request_duration_seconds_bucket"]
    buckets = tallied.snapshot().samples["gateway_request_duration_seconds_bucket"]
    assert [(s.labels["le"], s.value) for s in buckets] == [(s.labels["le"], s.value) for s in reference]
    assert tallied.snapshot().total("gateway_request_duration_seconds_sum") == pytest.approx(45.3026)


def test_tallied_requests_reach_the_series_at_the_next_refresh_only() -> None:
    metrics = Metrics()
    metrics.observe("GET", Outcome(service="svc", cache="HIT"), 200, 0.01)
    assert metrics.requests.labels("svc", "GET", "200")._value.get() == 0  # not yet folded
    snapshot = metrics.snapshot()
    assert snapshot.total("gateway_requests_total", service="svc", status="200") == 1
    assert snapshot.by("gateway_cache_total", "result") == {"hit": 1.0}
    assert metrics.snapshot().total("gateway_requests_total") == 1  # folded once, not again


async def test_the_last_tally_is_folded_when_the_app_stops() -> None:
    app = web.Application()
    metrics = app[METRICS] = Metrics()
    app.cleanup_ctx.append(refresh_in_background)
    runner = web.AppRunner(app)
    await runner.setup()
    await asyncio.sleep(0)  # the refresher's first refresh, then it sleeps for a second
    metrics.observe("GET", Outcome(service="svc"), 200, 0.01)
    await runner.cleanup()  # well within the refresher's first second
    assert metrics.requests.labels("svc", "GET", "200")._value.get() == 1  # in the series, without a refresh


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.5, {0.1: 0, 0.2: 10, float("inf"): 10}, 0.15, id="interpolated inside a bucket"),
        pytest.param(0.99, {0.1: 99, 1.0: 100, float("inf"): 100}, 0.1, id="rank on a bucket edge"),
        pytest.param(0.99, {0.1: 0, float("inf"): 5}, 0.1, id="in the +Inf bucket: its lower bound"),
        pytest.param(0.5, {0.1: 0, float("inf"): 0}, None, id="no observations"),
    ],
)
def test_quantile_matches_histogram_quantile(q: float, buckets: dict[float, float], expected: float | None) -> None:
    assert quantile(q, buckets) == pytest.approx(expected) if expected is not None else quantile(q, buckets) is None


async def test_cache_results_are_counted(make_gateway: MakeGateway, backend: TestServer) -> None:
    gateway = await make_gateway(
        'defaults: {{auth: none}}\nservices:\n  c:\n    upstreams: ["{upstream}"]\n    cache: {{ttl: 1m}}\n',
        upstream=upstream(backend),
    )
    for _ in range(3):
        await gateway.get("/api/c/echo/x")
    snapshot = gateway.app[METRICS].snapshot()
    assert snapshot.by("gateway_cache_total", "result") == {"miss": 1.0, "hit": 2.0}


async def _echo_socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


async def test_open_websockets_are_a_gauge(make_gateway: MakeGateway, aiohttp_server: Any) -> None:
    app = web.Application()
    app.router.add_get("/ws", _echo_socket)
    server = await aiohttp_server(app)
    text = 'defaults: {{auth: none}}\nservices:\n  chat: {{upstreams: ["{upstream}"], websocket: true}}\n'
    gateway = await make_gateway(text, upstream=upstream(server))
    metrics = gateway.app[METRICS]
    first, second = await gateway.ws_connect("/api/chat/ws"), await gateway.ws_connect("/api/chat/ws")
    for ws in (first, second):
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "hi"
    assert metrics.snapshot().total("gateway_websocket_connections") == 2
    await first.close()
    for _ in range(100):
        if metrics.snapshot().total("gateway_websocket_connections") == 1:
            break
        await asyncio.sleep(0.01)
    assert metrics.snapshot().total("gateway_websocket_connections") == 1
    await second.close()


async def test_asyncio_tasks_are_counted() -> None:
    metrics = Metrics()
    idle = [asyncio.create_task(asyncio.sleep(10)) for _ in range(5)]
    try:
        assert samples(metrics)[("gateway_asyncio_tasks", frozenset())] >= 6  # these five and the test's own
    finally:
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)


async def test_a_blocked_event_loop_shows_up_as_lag() -> None:
    metrics = Metrics()
    refresher = asyncio.create_task(metrics.refresher(every=0.05))
    try:
        await asyncio.sleep(0.01)  # the refresher is waiting for its next tick
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
        lag = 0.0
        for _ in range(500):  # the next tick measures it: poll, bounded
            lag = samples(metrics)[("gateway_event_loop_lag_seconds", frozenset())]
            if lag >= 0.2:
                break
            await asyncio.sleep(0.01)
        assert lag >= 0.2  # the tick was due 0.05 s after it started and ran after the 0.3 s block
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
