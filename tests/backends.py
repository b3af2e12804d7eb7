"""The echo backend the proxy tests run behind the gateway (STYLE 2.8; httpx's test server app).

One plain aiohttp app that dispatches on path, each route showing one thing a proxy must
get right: bodies and headers seen byte-exact (``/echo``), status codes, slowness,
streaming, duplicate ``Set-Cookie``, undecoded gzip, large bodies both ways, redirects
not followed, hop-by-hop headers removed, HEAD. What the backend saw is recorded in
``app[BACKEND_STATE]`` so a test can assert on the request the gateway forwarded.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import WSMsgType, hdrs, web
from aiohttp.typedefs import Handler

__all__ = [
    "BACKEND_STATE",
    "CHUNK_SIZE",
    "GZIP_BODY",
    "GZIP_TEXT",
    "HOP_BY_HOP_SENT",
    "BackendState",
    "RecordedRequest",
    "echo_app",
    "iter_pattern",
    "pattern_sha256",
]

CHUNK_SIZE = 64 * 1024  # body chunks read and written by /echo, /upload, /download
GZIP_TEXT = b"The gateway passes compressed bytes through untouched.\n" * 20
GZIP_BODY = gzip.compress(GZIP_TEXT, mtime=0)  # mtime=0: the same bytes on every run
HOP_BY_HOP_SENT = ("Connection", "X-Private-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade")
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)  # one chunk; /download repeats it


class RecordedRequest(NamedTuple):
    """One request as the backend received it."""

    method: str
    raw_path: str  # byte-exact request target, query included
    headers: list[tuple[str, str]]  # in order, duplicates kept


@dataclass(slots=True)
class BackendState:
    """What the echo backend has seen, and the knobs a test can turn."""

    hits: collections.Counter[str] = field(default_factory=collections.Counter)  # by request.path
    last_request: dict[str, Any] | None = None  # /echo's JSON without the body fields
    requests: list[RecordedRequest] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets /stream-hold finish
    count: int = 0  # /count


BACKEND_STATE = web.AppKey("backend_state", BackendState)


def echo_app() -> web.Application:
    """A fresh echo backend with empty state."""
    app = web.Application(middlewares=[_record])
    app[BACKEND_STATE] = BackendState()
    router = app.router
    router.add_route("*", "/echo", echo)
    router.add_route("*", "/echo/{tail:.*}", echo)
    router.add_route("*", "/status/{code}", status)
    router.add_route("*", "/slow/{seconds}", slow)
    router.add_get("/stream/{n}", stream)
    router.add_get("/stream-hold", stream_hold)
    router.add_get("/cookies", cookies)
    router.add_get("/gzip", gzip_body)
    router.add_get("/download/{size}", download)
    router.add_route("*", "/upload", upload)
    router.add_route("*", "/redirect", redirect)
    router.add_get("/hop", hop)
    router.add_get("/head-only", head_only, allow_head=False)
    router.add_head("/head-only", head_only)
    router.add_get("/headers-big", headers_big)
    router.add_route("*", "/count", count)
    router.add_get("/ws-echo", ws_echo)
    return app


def iter_pattern(size: int) -> Iterator[bytes]:
    """The bytes ``/download/{size}`` sends, in the same chunks."""
    for start in range(0, size, CHUNK_SIZE):
        yield _PATTERN[: min(CHUNK_SIZE, size - start)]


def pattern_sha256(size: int) -> str:
    """Hex sha256 of ``/download/{size}``'s body, computed in bounded memory."""
    digest = hashlib.sha256()
    for chunk in iter_pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[BACKEND_STATE]
    state.hits[request.path] += 1
    state.last_request = _describe(request)
    state.requests.append(RecordedRequest(request.method, request.raw_path, list(request.headers.items())))
    return await handler(request)


def _describe(request: web.Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "headers": [[name, value] for name, value in request.headers.items()],
    }


async def echo(request: web.Request) -> web.Response:
    """The request as received, as JSON; the body is hashed, not kept."""
    body = _describe(request)
    body["body_length"], body["body_sha256"] = await _consume(request)
    return web.json_response(body)


async def status(request: web.Request) -> web.Response:
    code = _int(request, "code")
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200..599")
    if code in (204, 205, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def slow(request: web.Request) -> web.Response:
    seconds = _number(request, "seconds", float)
    await asyncio.sleep(seconds)
    return web.Response(text=f"slept {seconds}\n")


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` chunks ``chunk-<i>\\n``, ``?delay=`` seconds apart (default 0.2), chunked encoding."""
    n = _int(request, "n")
    delay = float(request.query.get("delay", "0.2"))
    response = _chunked_text()
    await response.prepare(request)
    for i in range(n):
        if i:
            await asyncio.sleep(delay)
        await response.write(f"chunk-{i}\n".encode())
    await response.write_eof()
    return response


async def stream_hold(request: web.Request) -> web.StreamResponse:
    """``chunk-0\\n``, then ``chunk-1\\n`` once ``state.release`` is set (or ``?timeout=``, default 10s)."""
    timeout = float(request.query.get("timeout", "10"))
    response = _chunked_text()
    await response.prepare(request)
    await response.write(b"chunk-0\n")
    try:
        async with asyncio.timeout(timeout):  # a test that forgets to release must not hang shutdown
            await request.app[BACKEND_STATE].release.wait()
    except TimeoutError:
        pass
    await response.write(b"chunk-1\n")
    await response.write_eof()
    return response


async def cookies(request: web.Request) -> web.Response:
    response = web.Response(text="cookies\n")
    response.headers.add(hdrs.SET_COOKIE, "a=1; Path=/")
    response.headers.add(hdrs.SET_COOKIE, "b=2; HttpOnly")
    return response


async def gzip_body(request: web.Request) -> web.Response:
    """``GZIP_BODY`` as is; aiohttp's own compression stays off."""
    headers = {hdrs.CONTENT_ENCODING: "gzip", hdrs.CONTENT_TYPE: "text/plain"}
    return web.Response(body=GZIP_BODY, headers=headers)


async def download(request: web.Request) -> web.StreamResponse:
    """``size`` pattern bytes in 64 KiB writes; Content-Length unless ``?chunked=1``."""
    size = _int(request, "size")
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
    if request.query.get("chunked") == "1":
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    for chunk in iter_pattern(size):
        await response.write(chunk)  # drains: memory stays bounded however large size is
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    length, sha256 = await _consume(request)
    return web.json_response({"length": length, "sha256": sha256})


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, text="see /echo/target\n", headers={hdrs.LOCATION: "/echo/target"})


async def hop(request: web.Request) -> web.Response:
    """Hop-by-hop headers a proxy must drop (RFC 9110 §7.6.1 and one named in Connection)."""
    headers = {
        hdrs.CONNECTION: "close, X-Private-Hop",
        "X-Private-Hop": "secret",
        hdrs.KEEP_ALIVE: "timeout=5",
        hdrs.PROXY_AUTHENTICATE: "Basic",
        hdrs.TRAILER: "X-T",
        hdrs.UPGRADE: "h2c",
        "X-Kept": "yes",
    }
    return web.Response(text="hop\n", headers=headers)


async def head_only(request: web.Request) -> web.StreamResponse:
    if request.method == hdrs.METH_HEAD:
        response = web.StreamResponse()
        response.content_length = 3
        return response
    return web.Response(body=b"abc")


async def headers_big(request: web.Request) -> web.Response:
    return web.Response(text="big\n", headers={f"X-H-{i}": f"value-{i}-" + "x" * 40 for i in range(50)})


async def count(request: web.Request) -> web.Response:
    state = request.app[BACKEND_STATE]
    state.count += 1
    return web.json_response({"count": state.count})


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echoes text and binary; text ``close <code> <reason>`` makes it close with that code."""
    ws = web.WebSocketResponse(protocols=("chat", "echo"))
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            if message.data.startswith("close "):
                _, code, *reason = message.data.split(" ", 2)
                await ws.close(code=int(code), message=(reason[0] if reason else "").encode())
                break
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _consume(request: web.Request) -> tuple[int, str]:
    """Length and hex sha256 of the request body, read chunk by chunk."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        digest.update(chunk)
        length += len(chunk)
    return length, digest.hexdigest()


def _chunked_text() -> web.StreamResponse:
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/plain"})
    response.enable_chunked_encoding()
    return response


def _number(request: web.Request, key: str, kind: Callable[[str], float]) -> float:
    """A non-negative ``int`` or ``float`` from the path, or 400."""
    try:
        value = kind(request.match_info[key])
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a non-negative number") from None
    if not 0 <= value < math.inf:  # also refuses nan
        raise web.HTTPBadRequest(text=f"{key} must be a non-negative number")
    return value


def _int(request: web.Request, key: str) -> int:
    return int(_number(request, key, int))
