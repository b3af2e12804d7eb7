"""JWT auth wired into the gateway: per-route modes and scopes, claim headers upstream (DESIGN §5, §6)."""

from __future__ import annotations

import json
import logging
import time

import jwt
import pytest
from aiohttp.test_utils import TestServer

from tests.backends import BACKEND_STATE
from tests.conftest import JWT_TEST_SECRET, GatewayClient, MakeGateway, upstream
from tests.rawhttp import raw_request

YAML = """
jwt:
  secret: ${{JWT_SECRET}}
  claims_headers: {{sub: X-User-Id, scope: X-User-Scopes}}
services:
  svc:
    upstreams: ["{upstream}"]
    auth: optional
    routes:
      - {{path: /echo/public/*, auth: none}}
      - {{path: /echo/admin/*, auth: required, scopes: [svc:admin]}}
      - {{path: /echo/private/*, auth: required}}
"""


def token(sub: str = "alice", scope: str = "svc:read", **claims: object) -> str:
    now = int(time.time())
    payload = {"sub": sub, "scope": scope, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, JWT_TEST_SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def gateway(make_gateway: MakeGateway, backend: TestServer) -> GatewayClient:
    return await make_gateway(YAML, upstream=upstream(backend))


def _upstream_headers(backend: TestServer) -> dict[str, str]:
    request = backend.app[BACKEND_STATE].requests[-1]
    return {name.lower(): value for name, value in request.headers}


async def test_required_route_without_token_is_401_and_never_reaches_the_upstream(
    gateway: GatewayClient, backend: TestServer
) -> None:
    response = await gateway.get("/api/svc/echo/private/x")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert response.headers["Content-Type"] == "application/problem+json"
    assert backend.app[BACKEND_STATE].requests == []


async def test_required_route_with_token_forwards_claims_as_headers(
    gateway: GatewayClient, backend: TestServer
) -> None:
    response = await gateway.get("/api/svc/echo/private/x", headers=bearer(token("alice", "svc:read svc:write")))
    assert response.status == 200
    headers = _upstream_headers(backend)
    assert headers["x-user-id"] == "alice"
    assert headers["x-user-scopes"] == "svc:read svc:write"


async def test_authorization_header_reaches_the_upstream(gateway: GatewayClient, backend: TestServer) -> None:
    value = token()
    await gateway.get("/api/svc/echo/private/x", headers=bearer(value))
    assert _upstream_headers(backend)["authorization"] == f"Bearer {value}"


@pytest.mark.parametrize(
    "path",
    ["/api/svc/echo/public/x", "/api/svc/echo/any", "/api/svc/echo/private/x"],
    ids=["auth none", "auth optional", "auth required"],
)
async def test_client_sent_claim_headers_never_reach_the_upstream(
    gateway: GatewayClient, backend: TestServer, path: str
) -> None:
    spoofed = {"X-User-Id": "root", "X-User-Scopes": "svc:admin", **bearer(token("alice"))}
    response = await gateway.get(path, headers=spoofed)
    assert response.status == 200
    headers = _upstream_headers(backend)
    assert headers.get("x-user-id") in (None, "alice")
    assert headers.get("x-user-scopes") in (None, "svc:read")


@pytest.mark.parametrize(
    ("path", "claimed"),
    [("/api/svc/echo/public/x", []), ("/api/svc/echo/any", ["alice"]), ("/api/svc/echo/private/x", ["alice"])],
    ids=["auth none", "auth optional", "auth required"],
)
async def test_lower_case_client_sent_claim_headers_never_reach_the_upstream(
    gateway: GatewayClient, backend: TestServer, path: str, claimed: list[str]
) -> None:
    spoofed = f"x-user-id: root\r\nx-user-scopes: svc:admin\r\nAuthorization: Bearer {token('alice')}\r\n"
    response = await raw_request(gateway.server.port, path, headers=spoofed)  # the names go out as written
    assert response.status == 200
    seen = backend.app[BACKEND_STATE].requests[-1].headers  # every header, repeats kept, whatever their case
    assert [value for name, value in seen if name.lower() == "x-user-id"] == claimed
    assert [value for name, value in seen if name.lower() == "x-user-scopes"] == ["svc:read" for _ in claimed]


async def test_optional_route_without_token_is_anonymous(gateway: GatewayClient, backend: TestServer) -> None:
    response = await gateway.get("/api/svc/echo/any", headers={"X-User-Id": "root"})
    assert response.status == 200
    assert "x-user-id" not in _upstream_headers(backend)


async def test_optional_route_with_a_bad_token_is_401(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/any", headers=bearer(token() + "x"))
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_missing_scope_is_403(gateway: GatewayClient, backend: TestServer) -> None:
    response = await gateway.get("/api/svc/echo/admin/x", headers=bearer(token(scope="svc:read")))
    assert response.status == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert backend.app[BACKEND_STATE].requests == []


async def test_route_scope_granted_passes(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/admin/x", headers=bearer(token(scope="svc:read svc:admin")))
    assert response.status == 200


async def test_auth_none_route_ignores_a_bad_token(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/public/x", headers=bearer("garbage"))
    assert response.status == 200


async def test_expired_token_is_401(gateway: GatewayClient) -> None:
    response = await gateway.get("/api/svc/echo/private/x", headers=bearer(token(exp=int(time.time()) - 3600)))
    assert response.status == 401


async def test_subject_is_in_the_access_log_outcome(gateway: GatewayClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await gateway.get("/api/svc/echo/private/x", headers=bearer(token("bob")))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert lines[-1]["sub"] == "bob"
