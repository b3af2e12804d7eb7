"""Path normalisation, the escape check and first-match route overrides (DESIGN §4)."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp.test_utils import TestServer

from gateway.chain import RouteChain
from gateway.config import load_text
from gateway.routing import PathRejected, RouteTable, normalise_path
from middleware.problem import Problem
from tests.backends import BACKEND_STATE
from tests.conftest import MakeGateway, upstream
from tests.rawhttp import raw_request


@pytest.mark.parametrize(
    ("raw", "segments", "trailing"),
    [
        pytest.param("/api/users/a/b", ["api", "users", "a", "b"], False, id="plain"),
        pytest.param("/api/users/a/", ["api", "users", "a"], True, id="trailing slash"),
        pytest.param("/api//users///a", ["api", "users", "a"], False, id="empty segments merged"),
        pytest.param("/api/users/./a/../b", ["api", "users", "b"], False, id="dot segments resolved"),
        pytest.param("/api/users/a/..", ["api", "users"], True, id="ends in .. means a directory"),
        pytest.param("/api/users/%7Ealice%2d%41", ["api", "users", "~alice-A"], False, id="unreserved decoded"),
        pytest.param("/api/users/a%3ab%20c", ["api", "users", "a%3Ab%20c"], False, id="reserved kept, upper-cased"),
        pytest.param("/api/users/%2e%2e/x", ["api", "x"], False, id="encoded dots are dots"),
    ],
)
def test_normalise_path(raw: str, segments: list[str], trailing: bool) -> None:
    assert normalise_path(raw) == (segments, trailing)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param("/../etc/passwd", "climbs above the root", id="above root"),
        pytest.param("/api/a%2fb", "%2F is not allowed", id="encoded slash"),
        pytest.param("/api/a%5Cb", "%5C is not allowed", id="encoded backslash"),
        pytest.param("/api/a%00b", "%00 is not allowed", id="encoded NUL"),
        pytest.param("/api/a%0Ab", "%0A is not allowed", id="encoded LF"),
        pytest.param("/api/a%0db", "%0D is not allowed", id="encoded CR"),
        pytest.param("/api/a\\b", "backslashes", id="backslash"),
        pytest.param("/api/a%zzb", "invalid percent-encoding", id="bad escape"),
        pytest.param("/api/a%4", "invalid percent-encoding", id="truncated escape"),
        pytest.param("/api/a\x01b", "control characters", id="control character"),
        pytest.param("api/a", "absolute path", id="not absolute"),
    ],
)
def test_unsafe_paths_are_rejected(raw: str, reason: str) -> None:
    with pytest.raises(PathRejected, match=reason.replace("%", "%")):
        normalise_path(raw)


TABLE_YAML = """
defaults: {auth: none}
services:
  users:
    upstreams: [http://127.0.0.1:9]
    routes:
      - {path: /public/*, timeout: 5s}
      - {path: /admin/*, methods: [POST, DELETE]}
      - {path: /items/*/detail}
      - {path: /public/special}
"""


def _table() -> RouteTable:
    config = load_text(TABLE_YAML)
    chains = {route.name: RouteChain(route.name) for route in config.services["users"].routes}  # type: ignore[arg-type]
    return RouteTable(config.services, chains)


@pytest.mark.parametrize(
    ("method", "target", "route", "rest"),
    [
        pytest.param("GET", "/api/users/public/a/b", "users/routes/0", "/public/a/b", id="prefix pattern"),
        pytest.param("GET", "/api/users/public/special", "users/routes/0", "/public/special", id="first match wins"),
        pytest.param("POST", "/api/users/admin/x", "users/routes/1", "/admin/x", id="method matches"),
        pytest.param("GET", "/api/users/admin/x", "users", "/admin/x", id="other method falls through"),
        pytest.param("GET", "/api/users/items/7/detail", "users/routes/2", "/items/7/detail", id="star in a segment"),
        pytest.param(
            "GET", "/api/users/items/7/8/detail", "users", "/items/7/8/detail", id="star stays in one segment"
        ),
        pytest.param("GET", "/api/users/public", "users/routes/0", "/public", id="prefix root"),
        pytest.param("GET", "/api/users/publicity", "users", "/publicity", id="prefix is whole segments"),
        pytest.param("GET", "/api/users", "users", "", id="service root"),
        pytest.param("GET", "/api/users/", "users", "/", id="service root with slash"),
    ],
)
def test_route_table_matches_first_override(method: str, target: str, route: str, rest: str) -> None:
    match = _table().match(method, target)
    assert match is not None
    assert (match.route.name, match.target.rest) == (route, rest)


@pytest.mark.parametrize(
    "target",
    ["/", "/api", "/api/", "/api/orders/x", "/users/x", "/apiusers/x"],
)
def test_targets_outside_every_service_do_not_match(target: str) -> None:
    assert _table().match("GET", target) is None


def test_query_is_kept_raw() -> None:
    match = _table().match("GET", "/api/users/x?b=%2F&a=1+2&&c")
    assert match is not None
    assert match.target.query == "b=%2F&a=1+2&&c"


def test_empty_query_differs_from_no_query() -> None:
    with_mark = _table().match("GET", "/api/users/x?")
    without = _table().match("GET", "/api/users/x")
    assert with_mark is not None and without is not None
    assert (with_mark.target.query, without.target.query) == ("", None)


@pytest.mark.parametrize(
    "target",
    [
        "/api/users/../orders/x",
        "/api/users/%2e%2e/orders",
        "/api/users/%2E%2E/%2e%2e/etc/passwd",
        "/api/users/a/../../x",
        "/api/users/..",
        "/api/../users/x",
    ],
)
def test_paths_leaving_the_service_are_400(target: str) -> None:
    with pytest.raises(Problem) as info:
        _table().match("GET", target)
    assert info.value.status == 400


def test_a_rejected_target_is_rejected_every_time() -> None:
    table = _table()
    for _ in range(2):
        with pytest.raises(Problem):
            table.match("GET", "/api/users/../orders/x")


def test_the_same_target_with_another_method_gets_its_own_route() -> None:
    table = _table()
    post, get = table.match("POST", "/api/users/admin/x"), table.match("GET", "/api/users/admin/x")
    again = table.match("POST", "/api/users/admin/x")
    assert post is not None and get is not None and again is not None
    assert (post.route.name, get.route.name, again.route.name) == ("users/routes/1", "users", "users/routes/1")


def test_one_path_with_many_queries_keeps_each_query_and_method() -> None:
    table = _table()
    for i in range(3):  # the second and third are answered from the path's remembered match
        for method, route in (("POST", "users/routes/1"), ("GET", "users")):
            match = table.match(method, f"/api/users/admin/x?page={i}")
            assert match is not None
            assert (match.route.name, match.target.rest, match.target.query) == (route, "/admin/x", f"page={i}")
    without = table.match("GET", "/api/users/admin/x")
    assert without is not None and without.target.query is None


def test_a_rejected_path_is_rejected_whatever_its_query() -> None:
    table = _table()
    for i in range(2):
        with pytest.raises(Problem):
            table.match("GET", f"/api/users/../orders/x?q={i}")


def test_more_targets_than_are_remembered_all_match_right() -> None:
    table = _table()
    for round_ in range(2):
        for i in range(5000):  # past the 4096 remembered: the memory starts over and answers stay right
            match = table.match("GET", f"/api/users/items/{i}/detail?r={round_}")
            assert match is not None
            assert (match.route.name, match.target.rest) == ("users/routes/2", f"/items/{i}/detail")


# -- end to end, with raw requests (an HTTP client would tidy these paths up first) -------

YAML = """
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
    routes:
      - {{path: /echo/public/*, timeout: 5s}}
"""


async def test_normalised_path_reaches_the_upstream(make_gateway: MakeGateway, backend: TestServer) -> None:
    client = await make_gateway(YAML, upstream=upstream(backend))
    response = await raw_request(client.port, "/api/svc//echo/./a/b/../c%7e?q=%2F..%2F&x")
    assert response.status == 200
    assert json.loads(response.body)["raw_path"] == "/echo/a/c~?q=%2F..%2F&x"


@pytest.mark.parametrize(
    "target",
    ["/api/svc/../other/x", "/api/svc/%2e%2e/%2e%2e/etc/passwd", "/api/svc/echo/..%2f..%2fadmin", "/api/svc/echo%00"],
)
async def test_escaping_paths_get_400_and_never_reach_the_upstream(
    make_gateway: MakeGateway, backend: TestServer, target: str
) -> None:
    client = await make_gateway(YAML, upstream=upstream(backend))
    response = await raw_request(client.port, target)
    assert response.status == 400
    assert response.header("Content-Type") == "application/problem+json"
    assert json.loads(response.body)["status"] == 400
    assert backend.app[BACKEND_STATE].requests == []


async def test_unknown_service_is_404_problem(make_gateway: MakeGateway, backend: TestServer) -> None:
    client = await make_gateway(YAML, upstream=upstream(backend))
    response = await client.get("/api/nope/x", headers={"X-Request-ID": "r-404"})
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json()
    assert body["status"] == 404 and body["request_id"] == "r-404" and "/api/nope/x" in body["detail"]


async def test_the_matched_route_is_in_the_access_log(
    make_gateway: MakeGateway, backend: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_gateway(YAML, upstream=upstream(backend))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await client.get("/api/svc/echo/public/x")
        await client.get("/api/svc/echo/private/x")
    routes = [json.loads(r.getMessage())["route"] for r in caplog.records if r.name == "gateway.access"]
    assert routes == ["svc/routes/0", "svc"]


def test_the_gateway_app_refuses_to_be_mounted_under_a_prefix() -> None:
    from aiohttp import web

    from gateway.app import create_app

    parent = web.Application()
    with pytest.raises(ValueError, match="cannot be mounted under a prefix"):
        parent.add_subapp("/gw", create_app(load_text(TABLE_YAML)))
