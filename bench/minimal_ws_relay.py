"""The thinnest reasonable aiohttp WebSocket relay: the reference floor for ``ws-gateway``.

What the gateway's relay is compared with (issue 8: relay round trips ≥ 1.0x this). It
accepts a WebSocket on any path, opens one to the same path on the upstream through one
pooled ``ClientSession`` (made on startup, closed on cleanup), and relays text and binary
messages both ways until either side closes, passing the close code on. Nothing else: no
routing, auth, limits, subprotocols, forwarded headers or idle pings (ping/pong is
answered by each side's aiohttp, autoping). A plain GET is proxied as ``ok`` for the
harness's readiness probe. Keep it that way: it is a fixed reference.

Stdlib + aiohttp only; uvloop when installed (as the gateway), or ``--loop asyncio``:

    python bench/minimal_ws_relay.py --upstream http://127.0.0.1:9100 --port 8091
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientWebSocketResponse, DummyCookieJar, TCPConnector, WSMsgType, hdrs, web
from loops import new_loop

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def pump(source: web.WebSocketResponse | ClientWebSocketResponse,
               sink: web.WebSocketResponse | ClientWebSocketResponse) -> None:  # fmt: skip
    """Every message from ``source`` to ``sink``; on close, close ``sink`` with the same code."""
    async for msg in source:
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:  # ERROR
            break
    await sink.close(code=source.close_code or 1000)


async def relay(request: web.Request) -> web.StreamResponse:
    url = request.app[UPSTREAM] + request.raw_path
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        async with request.app[SESSION].get(url) as answer:  # the readiness probe
            return web.Response(status=answer.status, body=await answer.read())
    async with request.app[SESSION].ws_connect(url, autoping=True, max_msg_size=0) as upstream:
        client = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await client.prepare(request)
        tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        return client


async def client_session(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=0)  # a relayed socket holds its upstream connection for its lifetime
    async with ClientSession(connector=connector, cookie_jar=DummyCookieJar(), auto_decompress=False) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    args = parser.parse_args()
    loop_name, loop = new_loop(args.loop)
    print(f"minimal ws relay on http://{args.host}:{args.port} -> {args.upstream} (loop: {loop_name})", flush=True)
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None, loop=loop,
                backlog=4096)  # fmt: skip


if __name__ == "__main__":
    main()
