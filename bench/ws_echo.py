"""The WebSocket benchmark backend: one process that echoes every message back.

Any path upgrades; a plain GET answers ``ok`` (the harness's readiness probe). Run
``python bench/ws_echo.py --port 9100``. Uses uvloop when installed, like the gateway.

It speaks RFC 6455 on an asyncio Protocol (``ws_wire.py``), not through aiohttp: the
backend shares the load core with the load client, and an aiohttp echo took about half of
that core in a relay run, enough, with the client, to saturate it before the relay under
test did. As nginx is the HTTP benchmark's backend, this is the cheap one for WebSockets.
Text and binary messages come back with their opcode, pings get a pong, a close frame is
answered with one and the connection closed.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from loops import new_loop
from ws_wire import BINARY, CLOSE, MAX_HEAD, PING, PONG, TEXT, accept_key, frame, header_fields, split_frames

READY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Echo(asyncio.Protocol):
    """One connection: HTTP heads until an upgrade, then frames echoed as they come."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upgraded:
            self.echo()
            return
        while not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.refuse()
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            self.answer(head)
        self.echo()

    def answer(self, head: bytes) -> None:
        assert self.transport is not None
        _, fields = header_fields(head)
        if fields.get(b"upgrade", b"").lower() != b"websocket":
            self.transport.write(READY)  # keep-alive: the readiness probe may ask again
            return
        key = fields.get(b"sec-websocket-key")
        if key is None:
            self.refuse()
            return
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.decode("latin-1")).encode() + b"\r\n\r\n"
        )
        self.upgraded = True

    def echo(self) -> None:
        assert self.transport is not None
        out = []
        for fin, opcode, payload in split_frames(self.buffer):
            if opcode in (TEXT, BINARY) and fin:
                out.append(frame(opcode, payload, masked=False))
            elif opcode == PING:
                out.append(frame(PONG, payload, masked=False))
            elif opcode == CLOSE:
                out.append(frame(CLOSE, payload[:2], masked=False))
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD)
        self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096)
    print(f"ws echo on http://{host}:{port} (loop: {type(loop).__module__})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, loop = new_loop()
    try:
        loop.run_until_complete(serve(args.host, args.port))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
