"""gateway.admin: health, readiness, metrics, config (redacted), purge, explain; and in-process reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import AdminState, create_admin_app, redact
from gateway.app import ROUTES, create_app
from gateway.config import load_file, load_text
from gateway.metrics import METRICS
from gateway.reload import RELOADER, describe_changes
from gateway.reload import install as install_reload
from tests.conftest import JWT_TEST_SECRET, GatewayClient, MakeGateway, upstream

AdminClient = TestClient[web.Request, web.Application]

YAML = """
jwt: {{secret: "${{JWT_SECRET}}"}}
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
    cache: {{ttl: 1m}}
  dead:
    upstreams: ["http://127.0.0.1:1"]
    retries: 0
    circuit_breaker: {{failures: 1, cooldown: 1m}}
"""


@pytest.fixture
async def gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=upstream(backend))


@pytest.fixture
async def admin(gateway: GatewayClient, aiohttp_client: Any) -> AdminClient:
    client: AdminClient = await aiohttp_client(create_admin_app(gateway.app))
    return client


async def test_healthz_answers(admin: AdminClient) -> None:
    response = await admin.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readyz_names_what_is_degraded(gateway: GatewayClient, admin: AdminClient) -> None:
    body = await (await admin.get("/readyz")).json()
    assert body["status"] == "ready"
    assert body["checks"]["store"] == "ok"
    await gateway.get("/api/dead/x")  # one refused connection takes the only upstream out
    response = await admin.get("/readyz")
    assert response.status == 200  # degraded still serves
    body = await response.json()
    assert body["status"] == "degraded"
    assert body["degraded"] == ["service dead: no healthy upstream"]
    assert body["checks"]["upstreams"]["dead"] == {"http://127.0.0.1:1": False}


async def test_readyz_is_503_while_draining(gateway: GatewayClient, aiohttp_client: Any) -> None:
    state = AdminState()
    admin: AdminClient = await aiohttp_client(create_admin_app(gateway.app, state))
    state.draining = True
    response = await admin.get("/readyz")
    assert response.status == 503
    assert (await response.json())["degraded"] == ["draining: shutting down"]


async def test_metrics_is_prometheus_text(gateway: GatewayClient, admin: AdminClient) -> None:
    await gateway.get("/api/svc/echo/x")
    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    for name in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_websocket_connections",
        "gateway_upstream_healthy",
        "gateway_config_reloads_total",
    ):
        assert f"\n{name}" in text, name
    assert 'gateway_requests_total{method="GET",service="svc",status="200"} 1.0' in text


async def test_config_redacts_secrets(make_gateway: MakeGateway, backend: TestServer, aiohttp_client: Any) -> None:
    text = YAML + 'store: {{url: "redis://:hunter2@127.0.0.1:1/0", on_error: allow}}\n'
    gateway = await make_gateway(text, upstream=upstream(backend))
    admin: AdminClient = await aiohttp_client(create_admin_app(gateway.app))
    body = await (await admin.get("/config")).text()
    assert JWT_TEST_SECRET not in body and "hunter2" not in body
    config = (await (await admin.get("/config")).json())["config"]
    assert config["jwt"]["secret"] == "***"
    assert config["store"]["url"] == "redis://:***@127.0.0.1:1/0"
    assert config["services"]["svc"]["upstreams"] == [upstream(backend)]
    assert config["limits"]["drain_timeout"] == 10.0


def test_redact_walks_nested_values() -> None:
    assert redact({"password": 3, "inner": {"api_token": "x", "n": 2}, "l": [{"secret": None}]}) == {
        "password": "***",
        "inner": {"api_token": "***", "n": 2},
        "l": [{"secret": None}],
    }


async def test_purge_checks_its_arguments(admin: AdminClient) -> None:
    assert (await admin.post("/cache/purge")).status == 400
    assert (await admin.post("/cache/purge?service=nope")).status == 404
    assert (await admin.post("/cache/purge?service=svc&prefix=/a&tag=t")).status == 400
    response = await admin.post("/cache/purge?service=svc")
    assert response.status == 200
    assert (await response.json())["purged"] == 0


async def test_explain_endpoint(admin: AdminClient, backend: TestServer) -> None:
    response = await admin.get("/explain", params={"method": "GET", "path": "/api/svc/echo/x?y=1"})
    assert response.status == 200
    body = await response.json()
    assert body["service"] == "svc"
    assert body["upstream"]["url"] == f"{upstream(backend)}/echo/x?y=1"
    assert (await admin.get("/explain", params={"path": "/x", "header": "no colon"})).status == 400
    assert (await admin.get("/explain")).status == 400


async def test_dashboard_page_is_served_without_external_assets(admin: AdminClient) -> None:
    response = await admin.get("/")
    assert response.status == 200
    page = await response.text()
    assert 'new EventSource("events")' in page
    assert "http://" not in page and "https://" not in page  # no CDN


# -- reload in process ------------------------------------------------------------------

RELOAD_YAML = """
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
{extra}"""


async def reloadable(tmp_path: Path, backend: TestServer, aiohttp_client: Any, extra: str = "") -> GatewayClient:
    path = tmp_path / "routes.yaml"
    path.write_text(RELOAD_YAML.format(upstream=upstream(backend), extra=extra))
    app = create_app(load_file(path))
    install_reload(app, path, watch=False)
    client: GatewayClient = await aiohttp_client(app)
    return client


async def test_reload_swaps_routes_and_keeps_unchanged_pools(
    tmp_path: Path, backend: TestServer, aiohttp_client: Any
) -> None:
    gateway = await reloadable(tmp_path, backend, aiohttp_client)
    holder = gateway.app[ROUTES]
    pool = holder.pools["svc"]
    assert (await gateway.get("/api/new/echo/x")).status == 404
    extra = f'  new:\n    upstreams: ["{upstream(backend)}"]\n'
    (tmp_path / "routes.yaml").write_text(RELOAD_YAML.format(upstream=upstream(backend), extra=extra))
    assert await gateway.app[RELOADER].reload("test")
    assert (await gateway.get("/api/new/echo/x")).status == 200
    assert holder.pools["svc"] is pool  # breaker state survives
    status = gateway.app[RELOADER].status
    assert status.changes == {"added": ["new"], "removed": [], "changed": []}
    assert status.last_result == "success"
    assert gateway.app[METRICS].snapshot().total("gateway_config_reloads_total", result="success") == 1


async def test_an_invalid_file_keeps_the_old_routes(tmp_path: Path, backend: TestServer, aiohttp_client: Any) -> None:
    gateway = await reloadable(tmp_path, backend, aiohttp_client)
    version = gateway.app[RELOADER].status.version
    (tmp_path / "routes.yaml").write_text("services:\n  svc:\n    upstreams: [http://127.0.0.1:1]\n    timout: 1s\n")
    assert not await gateway.app[RELOADER].reload("test")
    assert (await gateway.get("/api/svc/echo/x")).status == 200
    status = gateway.app[RELOADER].status
    assert status.version == version
    assert status.errors == [f"{tmp_path / 'routes.yaml'}:4:5: services.svc.timout: unknown key"]
    assert gateway.app[METRICS].snapshot().total("gateway_config_reloads_total", result="failure") == 1


async def test_a_file_put_back_after_a_failed_reload_clears_the_failure(
    tmp_path: Path, backend: TestServer, aiohttp_client: Any
) -> None:
    path = tmp_path / "routes.yaml"
    served = RELOAD_YAML.format(upstream=upstream(backend), extra="")
    path.write_text(served)
    app = create_app(load_file(path))
    install_reload(app, path, every=0.02)  # the real watcher, polling fast
    gateway: GatewayClient = await aiohttp_client(app)
    status = gateway.app[RELOADER].status
    path.write_text(served + "    timout: 1s\n")
    await _until(lambda: status.last_result == "failure")
    path.write_text(served)  # an operator undoes the edit
    await _until(lambda: status.last_result == "unchanged")
    assert status.errors == []
    assert (await gateway.get("/api/svc/echo/x")).status == 200


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``, at most 5 s (the watcher polls every 20 ms here)."""
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the watcher did not get there within 5 s")


def test_describe_changes_names_services() -> None:
    old = load_text(
        "defaults: {auth: none}\nservices:\n  a: {upstreams: [http://h:1]}\n  b: {upstreams: [http://h:2]}\n"
    )
    new = load_text(
        "defaults: {auth: none}\nservices:\n  b: {upstreams: [http://h:3]}\n  c: {upstreams: [http://h:4]}\n"
    )
    assert describe_changes(old, new) == {"added": ["c"], "removed": ["a"], "changed": ["b"]}


def test_drain_timeout_is_a_duration_under_limits() -> None:
    config = load_text(
        "limits: {drain_timeout: 250ms}\ndefaults: {auth: none}\nservices:\n  a: {upstreams: [http://h:1]}\n"
    )
    assert config.limits.drain_timeout == 0.25


async def test_sections_bound_at_startup_are_reported_as_pending_restart(
    tmp_path: Path, backend: TestServer, aiohttp_client: Any
) -> None:
    gateway = await reloadable(tmp_path, backend, aiohttp_client)
    text = (tmp_path / "routes.yaml").read_text()
    (tmp_path / "routes.yaml").write_text("listen: {port: 8181}\ntrusted_proxies: [10.0.0.0/8]\n" + text)
    assert await gateway.app[RELOADER].reload("test")
    assert gateway.app[RELOADER].status.pending_restart == ["listen", "trusted_proxies"]


async def test_readyz_is_degraded_when_the_store_does_not_answer(
    make_gateway: MakeGateway, backend: TestServer, aiohttp_client: Any
) -> None:
    text = YAML + 'store: {{url: "redis://127.0.0.1:1/0", on_error: allow, timeout: 100ms}}\n'
    gateway = await make_gateway(text, upstream=upstream(backend))
    admin: AdminClient = await aiohttp_client(create_admin_app(gateway.app))
    response = await admin.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "degraded"
    assert body["degraded"] == ["store unreachable (rate limiting on_error: allow)"]


async def test_events_stream_frames_of_what_changed(gateway: GatewayClient, admin: AdminClient) -> None:
    async with admin.get("/events", params={"interval": "0.2"}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await response.content.readline() == b"retry: 2000\n"
        await response.content.readline()
        for _ in range(3):
            await gateway.get("/api/svc/echo/x")
        frames = []
        while not frames or frames[-1]["services"].get("svc", {}).get("total") != 3:
            assert len(frames) < 10, frames
            line = await response.content.readline()
            if line.startswith(b"data: "):
                frames.append(json.loads(line[6:]))
    moved = [f for f in frames if f["status_mix"]]
    assert sum(f["status_mix"].get("2xx", 0) for f in moved) == 3  # each request counted in one frame
    assert all(f["rps"] > 0 for f in moved)
    assert (await admin.get("/events", params={"interval": "soon"})).status == 400
