"""gateway.explain and ``gateway explain``: how a request would go, with no upstream call and no budget spent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestServer

from gateway.admin import create_admin_app
from gateway.cli import main
from gateway.explain import explain
from tests.backends import BACKEND_STATE
from tests.conftest import JWT_TEST_SECRET, GatewayClient, MakeGateway, upstream

YAML = """
jwt:
  secret: ${{JWT_SECRET}}
services:
  svc:
    upstreams: ["{upstream}", "http://127.0.0.1:1"]
    auth: optional
    rate_limit: {{requests: 3, per: 1m, key: sub}}
    cache: {{ttl: 30s}}
    routes:
      - {{path: /admin/*, auth: required, scopes: [svc:admin]}}
"""


def bearer(sub: str = "alice", scope: str = "svc:read") -> tuple[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": sub, "scope": scope, "iat": now, "exp": now + 600}, JWT_TEST_SECRET, algorithm="HS256")
    return "Authorization", f"Bearer {token}"


@pytest.fixture
async def gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=upstream(backend))


async def test_explains_route_upstream_auth_limit_and_cache(gateway: GatewayClient, backend: TestServer) -> None:
    result = await explain(gateway.app, "get", "/api/svc/users/1?x=2", [bearer()])
    assert result["service"] == "svc"
    assert result["route"] == {"name": "svc", "override": None}
    assert result["upstream"]["url"] == f"{upstream(backend)}/users/1?x=2"
    assert result["auth"]["result"] == "verified"
    assert result["auth"]["sub"] == "alice"
    assert result["rate_limit"] == {"limit": 3, "per": 60.0, "key": "sub:alice", "remaining": 3}
    assert result["cache"]["decision"] == "lookup (keyed by subject)"
    assert result["outcome"]["status"] is None
    assert backend.app[BACKEND_STATE].requests == []  # nothing was sent upstream


async def test_explain_reads_the_budget_without_spending_it(gateway: GatewayClient) -> None:
    name, value = bearer("bob")
    for _ in range(2):
        assert (await explain(gateway.app, "GET", "/api/svc/x", [(name, value)]))["rate_limit"]["remaining"] == 3
    assert (await gateway.get("/api/svc/echo/x", headers={name: value})).headers["X-RateLimit-Remaining"] == "2"
    assert (await explain(gateway.app, "GET", "/api/svc/x", [(name, value)]))["rate_limit"]["remaining"] == 2


@pytest.mark.parametrize(
    ("headers", "path", "status", "auth"),
    [
        pytest.param([], "/api/svc/admin/x", 401, "rejected", id="required route without a token"),
        pytest.param([bearer()], "/api/svc/admin/x", 403, "rejected", id="missing scope"),
        pytest.param([("Authorization", "Bearer junk")], "/api/svc/x", 401, "rejected", id="bad token on optional"),
        pytest.param([bearer(scope="svc:admin")], "/api/svc/admin/x", None, "verified", id="scope present"),
    ],
)
async def test_auth_outcomes(
    gateway: GatewayClient, headers: list[tuple[str, str]], path: str, status: int | None, auth: str
) -> None:
    result = await explain(gateway.app, "POST", path, headers)
    assert result["auth"]["result"] == auth
    assert result["outcome"]["status"] == status


@pytest.mark.parametrize(
    ("target", "status"),
    [pytest.param("/api/nowhere/x", 404, id="unknown service"), pytest.param("/api/svc/../x", 400, id="climbs out")],
)
async def test_unroutable_requests(gateway: GatewayClient, target: str, status: int) -> None:
    result = await explain(gateway.app, "GET", target)
    assert result["outcome"]["status"] == status
    assert "service" not in result


async def test_explain_finds_the_cache_entry_a_request_stored(gateway: GatewayClient) -> None:
    host = ("Host", f"127.0.0.1:{gateway.port}")  # part of the key: what the client sends
    before = await explain(gateway.app, "GET", "/api/svc/echo/c", [host])
    assert before["cache"]["would_hit"] is False
    assert (await gateway.get("/api/svc/echo/c")).headers["X-Cache"] == "MISS"
    after = await explain(gateway.app, "GET", "/api/svc/echo/c", [host])
    assert after["cache"]["would_hit"] is True
    assert after["cache"]["key"] == before["cache"]["key"]
    assert after["cache"]["entry"] == "fresh: a hit"
    assert (await gateway.get("/api/svc/echo/c")).headers["X-Cache"] == "HIT"
    assert "note" in (await explain(gateway.app, "GET", "/api/svc/echo/c"))["cache"]  # no Host given


async def test_post_bypasses_the_cache(gateway: GatewayClient) -> None:
    result = await explain(gateway.app, "POST", "/api/svc/x")
    assert result["cache"]["decision"].startswith("bypass: POST")
    assert result["rate_limit"]["key"] == "ip:127.0.0.1"  # no token: the client address


def test_cli_explain_offline(tmp_path: Path, backend_port: int, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", JWT_TEST_SECRET)
    config = tmp_path / "routes.yaml"
    config.write_text("admin: off\n" + YAML.format(upstream=f"http://127.0.0.1:{backend_port}"))
    name, value = bearer()
    assert main(["explain", "GET", "/api/svc/admin/x", "-c", str(config), "-H", f"{name}: {value}"]) == 0
    out = capsys.readouterr().out
    assert "GET /api/svc/admin/x  (client 127.0.0.1; offline)" in out
    assert "route      svc/routes/0 (override /admin/*)" in out
    assert "403: The token lacks the scope svc:admin" in out
    assert main(["explain", "GET", "/x", "-c", str(config), "-H", "nocolon"]) == 2


@pytest.fixture
def backend_port() -> int:
    return 9  # never contacted: explain sends nothing upstream


async def test_cli_asks_the_running_gateway(
    gateway: GatewayClient, aiohttp_server: Any, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", JWT_TEST_SECRET)
    admin = await aiohttp_server(create_admin_app(gateway.app))
    config = tmp_path / "routes.yaml"
    config.write_text(YAML.format(upstream="http://127.0.0.1:9"))
    name, value = bearer("carol")
    await gateway.get("/api/svc/echo/x", headers={name: value})
    url = f"http://127.0.0.1:{admin.port}"
    args = ["explain", "GET", "/api/svc/x", "-c", str(config), "--admin", url, "-H", f"{name}: {value}"]
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    assert f"(client 127.0.0.1; live, from {url})" in out
    assert "3 per 60s by key sub:carol: 2 left" in out  # the live budget, one request spent
    purge = ["purge", "--service", "svc", "-c", str(config), "--admin", url]
    assert await asyncio.to_thread(main, purge) == 0
    assert capsys.readouterr().out == "purged 1 cached entry of svc\n"
    assert await asyncio.to_thread(main, [*purge[:2], "nope", *purge[3:]]) == 1
    assert "gateway purge: no service named 'nope'" in capsys.readouterr().err
