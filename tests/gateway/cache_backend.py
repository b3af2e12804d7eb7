"""A backend for the cache tests that counts its hits and answers as its query says.

``GET /any/path?cc=max-age=5&age=9&status=404&cookie=1&vary=Accept&tag=a,b&size=N&chunked=1&delay=0.2``:
the body is ``<path>#<hit number>`` (or ``size`` bytes), so a test can tell a cached answer
from a fresh one; ``hits`` counts requests by path and method. ``down`` makes it answer 503.
The body also reflects what an upstream learns about the client's host (``X-Forwarded-Host``)
and, only when it says ``Vary: X-Variant``, that header: the classic poisoning targets.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ("CACHE_BACKEND", "CacheBackend", "cache_backend_app")


@dataclass(slots=True)
class CacheBackend:
    hits: collections.Counter[str] = field(default_factory=collections.Counter)  # "GET /a"
    down: bool = False

    def total(self, method: str = "GET") -> int:
        return sum(n for key, n in self.hits.items() if key.startswith(method + " "))


CACHE_BACKEND = web.AppKey("cache_backend", CacheBackend)


def cache_backend_app() -> web.Application:
    app = web.Application()
    app[CACHE_BACKEND] = CacheBackend()
    app.router.add_route("*", "/{tail:.*}", _answer)
    return app


async def _answer(request: web.Request) -> web.StreamResponse:
    state = request.app[CACHE_BACKEND]
    state.hits[f"{request.method} {request.path}"] += 1
    query = request.query
    if "delay" in query:
        await asyncio.sleep(float(query["delay"]))
    if state.down:
        return web.Response(status=503, text="down")
    n = state.hits[f"GET {request.path}"]
    text = f"{request.path}#{n} host={request.headers.get('X-Forwarded-Host')} sub={request.headers.get('X-User-Id')}"
    headers: list[tuple[str, str]] = [("X-Backend", "yes"), ("X-Multi", "one"), ("X-Multi", "two")]
    if "cc" in query:
        headers.append(("Cache-Control", query["cc"]))
    if "age" in query:  # as if it came through another cache: stale at once when max-age is shorter
        headers.append(("Age", query["age"]))
    if "cookie" in query:
        headers += [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    if "vary" in query:
        headers.append(("Vary", query["vary"]))
        if "X-Variant" in query["vary"]:
            text += f" variant={request.headers.get('X-Variant')}"
    if "tag" in query:
        headers.append(("Cache-Tag", query["tag"]))
    status = int(query.get("status", "200"))
    body = text.encode() if "size" not in query else b"x" * int(query["size"])
    if "chunked" in query:
        response = web.StreamResponse(status=status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 8192):
            await response.write(body[i : i + 8192])
        await response.write_eof()
        return response
    return web.Response(status=status, headers=headers, body=body if status != 204 else None)
