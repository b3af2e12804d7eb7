"""A proxy without aiohttp's server side (experiment, not the gateway): how much of a proxied
request aiohttp's ``Request`` / task / ``Response`` machinery is, measured as a floor.

An asyncio Protocol parses each request head with httptools (llhttp), as the gateway's upstream
client parses responses; a task per request sends it upstream on the gateway's own upstream
client (:class:`gateway.upstream_http.ConnectionPool`), reads the body whole, and writes the
response in one ``transport.write``: status line, the upstream's fields less hop-by-hop ones, its
body. Keep-alive; one request at a time per connection (no pipelining); GET without a body only;
no routing, no request id, no access log, no metrics, no limits. Any path goes to the upstream's
same path.

    python bench/lane_prototype.py --upstream http://127.0.0.1:8081 --port 8093 [--aiohttp]

``--aiohttp`` serves the same proxy through aiohttp's server instead (one catch-all handler, no
middleware, the access log off, the response a ``web.Response``): the difference between the two
is aiohttp's server side alone, the rest of the gateway's cost being its own features.

Not part of `make bench`: the measure of what a "proxying lane" below aiohttp could save at most
(bench/README.md, thirteenth session).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
from aiohttp import web
from loops import new_loop
from multidict import CIMultiDict
from yarl import URL

from gateway.proxy import HOP_BY_HOP
from gateway.upstream_http import ConnectionPool, UpstreamError

BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"


class Lane(asyncio.Protocol):
    """One client connection: heads parsed as they come, each request proxied by a task."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_message_complete(self) -> None:
        url, self.url = self.url.decode("latin-1"), b""
        headers, self.headers = self.headers, []
        method = self.parser.get_method().decode()
        asyncio.get_running_loop().create_task(self.proxy(method, url, headers))

    async def proxy(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        assert self.transport is not None
        sent = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() != "host"]
        try:
            async with await self.pool.request(method, target, sent, None) as response:
                body = await response.read()
                fields = [(n, v) for n, v in response.headers if n.lower() not in HOP_BY_HOP]
                status, reason = response.status, response.reason
        except UpstreamError:
            self.transport.write(BAD_GATEWAY)
            return
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in fields if name.lower() != "content-length"]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        self.transport.write("".join(lines).encode("latin-1") + body)


async def serve_aiohttp(upstream: str, port: int) -> None:
    pool = ConnectionPool(URL(upstream))

    async def proxy(request: web.Request) -> web.Response:
        sent = [(n, v) for n, v in request.headers.items() if n.lower() not in HOP_BY_HOP and n.lower() != "host"]
        try:
            async with await pool.request(request.method, request.raw_path, sent, None) as response:
                body = await response.read()
                fields = [(n, v) for n, v in response.headers if n.lower() not in HOP_BY_HOP]
                status, reason = response.status, response.reason
        except UpstreamError:
            return web.Response(status=502)
        kept = CIMultiDict((n, v) for n, v in fields if n.lower() != "content-length")
        return web.Response(status=status, reason=reason, headers=kept, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print(f"aiohttp on the same upstream client on http://127.0.0.1:{port} -> {upstream}", flush=True)
    await asyncio.Event().wait()


async def serve(upstream: str, port: int) -> None:
    pool = ConnectionPool(URL(upstream))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Lane(pool), "127.0.0.1", port, backlog=4096)
    print(f"lane prototype on http://127.0.0.1:{port} -> {upstream} (loop: {type(loop).__module__})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aiohttp", action="store_true", help="serve through aiohttp's server instead")
    args = parser.parse_args()
    _, loop = new_loop()
    try:
        loop.run_until_complete((serve_aiohttp if args.aiohttp else serve)(args.upstream, args.port))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
