"""The floor of a cache hit answered below aiohttp: an asyncio protocol that parses requests
with httptools and answers each with a stored response (fresh X-Request-ID, X-Cache, Age),
writing one orjson access-log line per request to stdout in batches. Not a gateway: no routes,
no keys, no checks. It measures what a hit costs when no aiohttp Request, Response, task or
middleware is made for it (bench/README.md, "Where the microseconds go").

    taskset -c 1 .venv/bin/python bench/connection_level_hit.py --port 18496 --body FILE > /dev/null
    taskset -c 0 wrk -t1 -c64 -d4s http://127.0.0.1:18496/api/static/hello.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import httptools
import orjson
from loops import new_loop

LOG_BATCH = 64  # access-log lines per write


class HitProtocol(asyncio.Protocol):
    def __init__(self, body: bytes, log: list[bytes]) -> None:
        self._body = body
        self._log = log
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_message_complete(self) -> None:
        request_id = os.urandom(16).hex()
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Cache: HIT\r\n"
            b"Cache-Status: gateway; hit\r\nAge: 1\r\nX-Request-ID: %s\r\n\r\n" % (len(self._body), request_id.encode())
        )
        assert self._transport is not None
        self._transport.write(head + self._body)
        path = self._url.decode()
        line = {"time": time.time(), "request_id": request_id, "path": path, "status": 200, "cache": "HIT"}
        self._log.append(orjson.dumps(line))
        if len(self._log) >= LOG_BATCH:
            os.write(1, b"\n".join(self._log) + b"\n")
            self._log.clear()


async def serve(port: int, body: bytes) -> None:
    log: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(lambda: HitProtocol(body, log), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=18496)
    parser.add_argument("--body", type=Path, required=True, help="the stored response body")
    args = parser.parse_args()
    _, loop = new_loop()
    try:
        loop.run_until_complete(serve(args.port, args.body.read_bytes()))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
