"""Request id in and out, client address, and the access-log line (DESIGN §5, §8)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from datetime import UTC, datetime

import pytest
from aiohttp import web

from middleware.base import CLIENT_IP
from middleware.problem import Problem, ProblemMiddleware
from middleware.request_id import RequestIdMiddleware, UtcMillis, client_address, new_request_id

from .conftest import MakeClient


async def test_request_id_is_generated_and_echoed(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/")
    assert len(response.headers["X-Request-ID"]) == 32


async def test_sane_client_request_id_is_kept(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/", headers={"X-Request-ID": "abc-123.trace"})
    assert response.headers["X-Request-ID"] == "abc-123.trace"


@pytest.mark.parametrize(
    "sent", ["a" * 200, "with space", "semi;colon", ""], ids=["long", "space", "semicolon", "empty"]
)
async def test_insane_client_request_id_is_replaced(make_client: MakeClient, sent: str) -> None:
    client = await make_client()
    response = await client.get("/", headers={"X-Request-ID": sent})
    assert response.headers["X-Request-ID"] != sent
    assert len(response.headers["X-Request-ID"]) == 32


async def test_request_id_is_on_problem_responses(make_client: MakeClient) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        raise Problem(418, "no coffee")

    client = await make_client(handler=fail)
    response = await client.get("/", headers={"X-Request-ID": "rid-1"})
    assert response.status == 418
    assert response.headers["Content-Type"] == "application/problem+json"
    assert await response.json() == {
        "type": "about:blank", "title": "I'm a Teapot", "status": 418, "detail": "no coffee", "request_id": "rid-1",
    }  # fmt: skip
    assert response.headers["X-Request-ID"] == "rid-1"


async def test_unexpected_exception_is_a_problem_500_and_logged(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("bug")

    client = await make_client(handler=crash)
    with caplog.at_level(logging.ERROR, logger="middleware.problem"):
        response = await client.get("/")
    assert response.status == 500
    body = await response.json()
    assert body["status"] == 500 and "bug" not in body["detail"]
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


async def test_access_log_is_one_json_line_per_request(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await client.get("/some/path?token=secret", headers={"X-Request-ID": "rid-2"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "rid-2"
    assert line["method"] == "GET" and line["path"] == "/some/path" and line["status"] == 200
    assert "secret" not in json.dumps(line)
    assert set(line) >= {"time", "service", "upstream", "duration_ms", "cache", "ratelimit_remaining", "sub"}


TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        pytest.param("1.2.3.4", "9.9.9.9", "1.2.3.4", id="untrusted peer: header ignored"),
        pytest.param("10.0.0.1", "9.9.9.9", "9.9.9.9", id="trusted peer: header used"),
        pytest.param("10.0.0.1", "6.6.6.6, 9.9.9.9, 10.0.0.2", "9.9.9.9", id="rightmost untrusted hop"),
        pytest.param("10.0.0.1", "garbage, 9.9.9.9", "9.9.9.9", id="garbage stops the walk"),
        pytest.param("10.0.0.1", "10.0.0.3", "10.0.0.3", id="all trusted: the farthest"),
        pytest.param("10.0.0.1", None, "10.0.0.1", id="no header"),
    ],
)
def test_client_address_honours_trusted_proxies(peer: str, xff: str | None, expected: str) -> None:
    assert client_address(peer, xff, TRUSTED) == expected


async def test_client_address_is_on_the_request(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    async def show(request: web.Request) -> web.StreamResponse:
        return web.Response(text=request[CLIENT_IP])

    app = web.Application(middlewares=[RequestIdMiddleware(trusted_proxies=[ipaddress.ip_network("127.0.0.1/32")])])
    app.router.add_get("/", show)
    client = await aiohttp_client(app)
    response = await client.get("/", headers={"X-Forwarded-For": "203.0.113.9"})
    assert await response.text() == "203.0.113.9"


@pytest.mark.parametrize("now", [0.0, 1795312725.0, 1795312725.539871, 1795312725.9999, 1795312799.001])
def test_log_time_is_utc_iso_8601_with_milliseconds(now: float) -> None:
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert UtcMillis(lambda: now)() == expected


def test_log_time_follows_the_clock_across_milliseconds_and_seconds() -> None:
    times = iter([10.5, 10.5004, 10.5011, 10.7, 11.2])
    stamp = UtcMillis(lambda: next(times))
    assert [stamp(), stamp(), stamp(), stamp(), stamp()] == [
        "1970-01-01T00:00:10.500Z",
        "1970-01-01T00:00:10.500Z",
        "1970-01-01T00:00:10.501Z",
        "1970-01-01T00:00:10.700Z",
        "1970-01-01T00:00:11.200Z",
    ]


def test_a_forked_worker_makes_request_ids_of_its_own() -> None:
    new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its first id, to the parent
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = new_request_id()  # the id the worker would have made too, had it kept the parent's random state
    assert re.fullmatch("[0-9a-f]{32}", child) and re.fullmatch("[0-9a-f]{32}", parent)
    assert child != parent


async def test_errors_hook_turns_the_handlers_exception_into_the_logged_response(
    aiohttp_client,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    """The gateway's one app-wide frame: problems rendered by the request-id middleware itself."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        raise Problem(429, "slow down")

    app = web.Application(middlewares=[RequestIdMiddleware(errors=ProblemMiddleware().render)])
    app.router.add_get("/", refuse)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = await client.get("/", headers={"X-Request-ID": "rid-2"})
    assert response.status == 429
    assert (await response.json())["request_id"] == "rid-2"
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert line["status"] == 429 and line["error"] == "slow down"


async def test_errors_hook_passes_on_what_it_raises_again(
    aiohttp_client,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    """A redirect is no problem: the hook raises it again, aiohttp answers it, the log says so."""

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    app = web.Application(middlewares=[RequestIdMiddleware(errors=ProblemMiddleware().render)])
    app.router.add_get("/", moved)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = await client.get("/", allow_redirects=False)
    assert response.status == 302
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert line["error"] == "HTTPFound"
