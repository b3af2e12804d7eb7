"""The WebSocket benchmark backend: one aiohttp process that echoes every message back.

Any path upgrades; a plain GET answers ``ok`` (the harness's readiness probe). Run
``python bench/ws_echo.py --port 9100``. Uses uvloop when installed, like the gateway.
"""

from __future__ import annotations

import argparse

from aiohttp import WSMsgType, web
from loops import new_loop


async def echo(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.Response(text="ok")
    ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, loop = new_loop()
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    print(f"ws echo on http://{args.host}:{args.port} (loop: {type(loop).__module__})", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop, backlog=4096)


if __name__ == "__main__":
    main()
