"""Round robin, the circuit breaker and retries (DESIGN §5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.config import BreakerConfig
from gateway.upstreams import UpstreamPool
from tests.backends import BACKEND_STATE, echo_app
from tests.conftest import REFUSED, MakeGateway, upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(count: int = 3, *, failures: int = 2, cooldown: float = 10.0) -> tuple[UpstreamPool, Clock]:
    clock = Clock()
    urls = [URL(f"http://127.0.0.1:{9000 + i}") for i in range(count)]
    return UpstreamPool("svc", urls, BreakerConfig(failures=failures, cooldown=cooldown), clock=clock), clock


def test_round_robin_visits_every_upstream_in_turn() -> None:
    pool, _ = _pool(3)
    picks = [pool.pick() for _ in range(6)]
    assert [p.url.port for p in picks if p] == [9000, 9001, 9002, 9000, 9001, 9002]


def test_pick_skips_excluded_upstreams() -> None:
    pool, _ = _pool(2)
    first = pool.pick()
    assert first is not None
    second = pool.pick(exclude=[first])
    assert second is not None and second is not first
    assert pool.pick(exclude=[first, second]) is None


def test_breaker_opens_after_consecutive_failures() -> None:
    pool, _ = _pool(2, failures=2)
    bad = pool.upstreams[0]
    pool.failed(bad)
    assert pool.healthy(bad)
    pool.failed(bad)
    assert not pool.healthy(bad)
    assert {pool.pick().url.port for _ in range(4)} == {9001}  # type: ignore[union-attr]


def test_success_resets_the_failure_count() -> None:
    pool, _ = _pool(2, failures=2)
    bad = pool.upstreams[0]
    pool.failed(bad)
    pool.succeeded(bad)
    pool.failed(bad)
    assert pool.healthy(bad)


def test_open_upstream_is_tried_again_after_the_cooldown() -> None:
    pool, clock = _pool(1, failures=1, cooldown=10)
    only = pool.upstreams[0]
    pool.failed(only)
    assert pool.pick() is None
    clock.now += 10
    assert pool.pick() is only


def test_half_open_upstream_that_fails_again_goes_straight_back_out() -> None:
    pool, clock = _pool(1, failures=3, cooldown=10)
    only = pool.upstreams[0]
    for _ in range(3):
        pool.failed(only)
    clock.now += 10
    assert pool.pick() is only
    pool.failed(only)  # one failure is enough while half-open
    assert pool.pick() is None


# -- end to end ------------------------------------------------------------------------

YAML = """
defaults: {{auth: none, retries: {retries}, timeout: 2s, connect_timeout: 1s}}
services:
  svc:
    upstreams: [{upstreams}]
    circuit_breaker: {{failures: 2, cooldown: 30s}}
"""


@pytest.fixture
async def second_backend(aiohttp_server) -> TestServer:  # type: ignore[no-untyped-def]
    server: TestServer = await aiohttp_server(echo_app())
    return server


async def test_requests_alternate_between_upstreams(
    make_gateway: MakeGateway, backend: TestServer, second_backend: TestServer
) -> None:
    client = await make_gateway(YAML, retries=1, upstreams=f"{upstream(backend)}, {upstream(second_backend)}")
    for _ in range(6):
        assert (await client.get("/api/svc/count")).status == 200
    assert backend.app[BACKEND_STATE].count == 3
    assert second_backend.app[BACKEND_STATE].count == 3


async def test_one_dead_upstream_costs_no_failed_requests(make_gateway: MakeGateway, backend: TestServer) -> None:
    dead = REFUSED
    client = await make_gateway(YAML, retries=1, upstreams=f"{dead}, {upstream(backend)}")
    statuses = [(await client.post("/api/svc/count")).status for _ in range(10)]
    assert statuses == [200] * 10  # a refused connect never reached the upstream: retried even for POST
    assert backend.app[BACKEND_STATE].count == 10


async def test_all_upstreams_out_is_503(make_gateway: MakeGateway) -> None:
    dead = REFUSED
    client = await make_gateway(YAML, retries=0, upstreams=dead)
    first = [(await client.get("/api/svc/x")).status for _ in range(2)]
    assert first == [502, 502]
    response = await client.get("/api/svc/x")
    assert response.status == 503
    assert response.headers["Content-Type"] == "application/problem+json"


@pytest.fixture
async def resetter() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream that reads a request and closes the connection without answering."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    server.close()
    await server.wait_closed()


async def test_idempotent_request_is_retried_on_another_upstream_after_a_reset(
    make_gateway: MakeGateway, backend: TestServer, resetter: tuple[str, list[bytes]]
) -> None:
    url, seen = resetter
    client = await make_gateway(YAML, retries=1, upstreams=f"{url}, {upstream(backend)}")
    response = await client.get("/api/svc/count")
    assert response.status == 200
    assert seen  # (aiohttp itself may retry an idempotent request once on the same upstream)
    assert backend.app[BACKEND_STATE].count == 1


async def test_non_idempotent_request_that_reached_an_upstream_is_never_retried(
    make_gateway: MakeGateway, backend: TestServer, resetter: tuple[str, list[bytes]]
) -> None:
    url, seen = resetter
    client = await make_gateway(YAML, retries=1, upstreams=f"{url}, {upstream(backend)}")
    response = await client.post("/api/svc/count", data=b"{}")
    assert response.status == 502
    assert len(seen) == 1 and backend.app[BACKEND_STATE].count == 0


async def test_retries_zero_means_one_attempt(
    make_gateway: MakeGateway, backend: TestServer, resetter: tuple[str, list[bytes]]
) -> None:
    url, _ = resetter
    client = await make_gateway(YAML, retries=0, upstreams=f"{url}, {upstream(backend)}")
    assert (await client.get("/api/svc/count")).status == 502
    assert backend.app[BACKEND_STATE].count == 0
