"""The thinnest reasonable aiohttp reverse proxy: the reference floor for the benchmarks.

Everything the gateway does beyond this (routing, the middleware chain, streaming,
X-Forwarded-*, request ids, access log, retries, circuit breaker) is what it costs on
top of this figure (issue 8). It does deliberately little and nothing clever:

* one pooled ``ClientSession`` made on startup (no cookie jar, no auto-decompression,
  redirects not followed), closed on cleanup;
* hop-by-hop headers (RFC 9110 §7.6.1 and those named in ``Connection``) removed both ways;
* the request body read whole and sent, the upstream body read whole and returned.

Stdlib + aiohttp only; run ``python bench/minimal_proxy.py --upstream http://127.0.0.1:8081``.
``--processes N`` forks N-1 more processes sharing the port (SO_REUSEPORT), as ``gateway run
--workers N`` does: the control for what processes sharing cores cost any aiohttp app.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, hdrs, web
from loops import new_loop
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        "Keep-Alive",
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
    )
)
# Set again by aiohttp from the upstream URL and from the body we send or return.
RECOMPUTED = frozenset({hdrs.HOST.lower(), hdrs.CONTENT_LENGTH.lower()})

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones (duplicates, e.g. Set-Cookie, kept)."""
    named = {token.strip().lower() for value in headers.getall(hdrs.CONNECTION, ()) for token in value.split(",")}
    skip = HOP_BY_HOP | RECOMPUTED | named
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in skip)


async def proxy(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    body = await request.read() if request.body_exists else None
    async with session.request(
        request.method, url, headers=end_to_end(request.headers), data=body, allow_redirects=False
    ) as upstream:
        payload = await upstream.read()
        return web.Response(status=upstream.status, headers=end_to_end(upstream.headers), body=payload)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=0, keepalive_timeout=60)
    async with ClientSession(
        connector=connector,
        cookie_jar=DummyCookieJar(),
        auto_decompress=False,
        timeout=ClientTimeout(total=30),
    ) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--processes", type=int, default=1, help="processes sharing the port (default 1)")
    args = parser.parse_args()
    for _ in range(args.processes - 1):
        if os.fork() == 0:  # a child serves too, and forks no further
            break
    loop_name, loop = new_loop(args.loop)
    print(f"minimal proxy on http://{args.host}:{args.port} -> {args.upstream} (loop: {loop_name})", flush=True)
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
        reuse_port=args.processes > 1 or None,
    )


if __name__ == "__main__":
    main()
