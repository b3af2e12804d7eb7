"""The demo users service (examples/users.py), one behaviour per test."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from examples.users import USERS, create_app

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app())


async def test_list_returns_the_seeded_users(client: Client) -> None:
    response = await client.get("/users")
    assert response.status == 200
    body = await response.json()
    assert [user["name"] for user in body["users"]] == ["alice", "bob", "carol"]
    assert body["total"] == 3


async def test_list_pages_with_limit_and_offset(client: Client) -> None:
    body = await (await client.get("/users", params={"limit": "1", "offset": "1"})).json()
    assert [user["name"] for user in body["users"]] == ["bob"]
    assert (body["limit"], body["offset"], body["total"]) == (1, 1, 3)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"limit": "x"}, id="not a number"),
        pytest.param({"limit": "-1"}, id="negative"),
        pytest.param({"limit": "1000"}, id="over the maximum"),
        pytest.param({"offset": "1.5"}, id="fractional offset"),
    ],
)
async def test_bad_paging_parameters_are_400(client: Client, query: dict[str, str]) -> None:
    response = await client.get("/users", params=query)
    assert response.status == 400
    assert (await response.json())["status"] == 400


async def test_get_returns_one_user(client: Client) -> None:
    response = await client.get("/users/1")
    assert response.status == 200
    assert await response.json() == {"id": 1, "name": "alice", "email": "alice@example.com"}


@pytest.mark.parametrize("user_id", ["99", "abc"])
async def test_unknown_user_is_json_404(client: Client, user_id: str) -> None:
    response = await client.get(f"/users/{user_id}")
    assert response.status == 404
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"] == "Not Found"
    assert user_id in body["detail"]


async def test_create_answers_201_with_location(client: Client) -> None:
    response = await client.post("/users", json={"name": "dave", "email": "dave@example.com"})
    assert response.status == 201
    created = await response.json()
    assert created == {"id": 4, "name": "dave", "email": "dave@example.com"}
    assert response.headers["Location"] == "/users/4"
    assert (await (await client.get("/users/4")).json()) == created


async def test_create_rejects_invalid_json(client: Client) -> None:
    response = await client.post("/users", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert "JSON" in (await response.json())["detail"]


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        pytest.param({"name": "dave"}, "missing fields: email", id="missing email"),
        pytest.param({}, "missing fields: name, email", id="missing both"),
        pytest.param({"name": "", "email": "d@example.com"}, "name must be", id="empty name"),
        pytest.param({"name": "dave", "email": "nope"}, "email must be", id="bad email"),
        pytest.param(["dave"], "JSON object", id="not an object"),
    ],
)
async def test_create_validates_fields(client: Client, payload: object, detail: str) -> None:
    response = await client.post("/users", json=payload)
    assert response.status == 400
    assert detail in (await response.json())["detail"]


async def test_put_replaces_a_user(client: Client) -> None:
    response = await client.put("/users/2", json={"name": "robert", "email": "robert@example.com"})
    assert response.status == 200
    assert await (await client.get("/users/2")).json() == {"id": 2, "name": "robert", "email": "robert@example.com"}


async def test_put_unknown_user_is_404(client: Client) -> None:
    response = await client.put("/users/99", json={"name": "x", "email": "x@example.com"})
    assert response.status == 404


async def test_delete_answers_204_and_removes_the_user(client: Client) -> None:
    response = await client.delete("/users/3")
    assert response.status == 204
    assert await response.read() == b""
    assert (await client.get("/users/3")).status == 404


async def test_unsupported_method_is_405_with_allow(client: Client) -> None:
    response = await client.patch("/users/1")
    assert response.status == 405
    assert "PUT" in response.headers["Allow"]
    assert (await response.json())["status"] == 405


async def test_public_info_is_publicly_cacheable(client: Client) -> None:
    response = await client.get("/public/info")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "public, max-age=60"
    assert (await response.json())["users"] == 3


async def test_health_is_ok(client: Client) -> None:
    response = await client.get("/health")
    assert await response.json() == {"status": "ok", "service": "users"}


async def test_whoami_echoes_forwarded_identity(client: Client) -> None:
    headers = {
        "X-User-Id": "alice",
        "X-User-Scopes": "users:read users:admin",
        "X-Forwarded-For": "203.0.113.7, 10.0.0.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example",
        "X-Request-ID": "req-1",
    }
    body = await (await client.get("/whoami", headers=headers)).json()
    assert body == {
        "user_id": "alice",
        "scopes": ["users:read", "users:admin"],
        "forwarded_for": "203.0.113.7, 10.0.0.1",
        "forwarded_proto": "https",
        "forwarded_host": "api.example",
        "request_id": "req-1",
    }


async def test_whoami_without_identity_is_anonymous(client: Client) -> None:
    body = await (await client.get("/whoami")).json()
    assert body["user_id"] is None
    assert body["scopes"] == []


async def test_every_response_names_the_instance(client: Client) -> None:
    port = client.server.port
    for path in ("/users", "/users/99", "/nowhere"):
        assert (await client.get(path)).headers["X-Served-By"] == f"users@{port}"


async def test_served_by_uses_the_app_name(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(name="users-b"))
    assert (await client.get("/health")).headers["X-Served-By"].startswith("users-b@")


async def test_each_app_has_its_own_records(aiohttp_client: AiohttpClient) -> None:
    first, second = create_app(), create_app()
    client = await aiohttp_client(first)
    await client.delete("/users/1")
    assert 1 not in first[USERS].users
    assert 1 in second[USERS].users
