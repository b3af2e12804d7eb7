"""Lines of Python run per request, by function: where a request's time goes, for finding what to cut.

Starts the gateway of ``CONFIG`` in this process on uvloop (as ``gateway run`` serves), sends a
few requests to warm it, then traces (``sys.settrace``, this thread only) while ``--clients``
blocking clients, each on its own keep-alive connection in a thread, send ``--requests`` GETs
each, every one to a new URL (``?q=<n>``: a cached route misses). Prints the lines per request by
module and by function, and how many times each function was entered or resumed ("calls": a
coroutine counts once per resume).

A line is not a fixed cost (about 600 instructions on average in the full chain, measured on
2026-11-22), and tracing slows everything down, so this ranks; ``perf stat`` measures
(``ab_chain_instructions.sh``). Not run by ``make bench``.

    .venv/bin/python bench/lines_per_request.py routes.yaml --path /api/static/hello.json \\
        -H "Authorization: Bearer $TOKEN" --clients 16 --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import uvloop

from gateway import server
from gateway.config import load_file


class LineCounter:
    """A ``sys.settrace`` tracer counting line events and entries per function."""

    def __init__(self) -> None:
        self.lines: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.modules: collections.Counter[str] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        module = os.path.basename(code.co_filename)
        name = f"{module}:{code.co_name}"
        if event == "call":
            self.calls[name] += 1

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "line":
                self.lines[name] += 1
                self.modules[module] += 1
            return local

        return local


def client(port: int, path: str, headers: list[str], count: int, tag: str) -> None:
    """``count`` GETs on one keep-alive connection, each read to the end of its body."""
    extra = "".join(f"{header}\r\n" for header in headers)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for n in range(count):
            sock.sendall(f"GET {path}?q={tag}-{n} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
            length = next(int(value) for name, _, value in fields if name.strip().lower() == b"content-length")
            while len(body) < length:
                body += sock.recv(65536)


async def measure(args: argparse.Namespace) -> LineCounter:
    config = load_file(args.config)
    port = config.listen.port
    serving = asyncio.create_task(
        server._serve(config, "127.0.0.1", port, reuse_port=False, drain_timeout=1, metrics_dir=None, watch=None)
    )
    await asyncio.sleep(1.5)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(args.clients) as pool:
        await loop.run_in_executor(pool, client, port, args.path, args.header, 5, "warm")
        counter = LineCounter()
        tag = f"t{time.time()}"
        sys.settrace(counter)
        try:
            await asyncio.gather(
                *(
                    loop.run_in_executor(pool, client, port, args.path, args.header, args.requests, f"{tag}-{k}")
                    for k in range(args.clients)
                )
            )
        finally:
            sys.settrace(None)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a routes.yaml whose listen port is free (admin: off is simplest)")
    parser.add_argument("--path", default="/api/static/hello.json")
    parser.add_argument("-H", "--header", action="append", default=[], help="a request header, 'Name: value'")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args()
    counter = uvloop.run(measure(args))
    total = args.clients * args.requests
    lines, calls = sum(counter.lines.values()) / total, sum(counter.calls.values()) / total
    print(f"{lines:.0f} lines per request, {calls:.0f} calls")
    print("\nby module:")
    for module, lines in counter.modules.most_common(25):
        print(f"{lines / total:8.1f}  {module}")
    print("\nby function (lines, calls per request):")
    for name, lines in counter.lines.most_common(args.top):
        print(f"{lines / total:8.1f} {counter.calls[name] / total:6.1f}  {name}")


if __name__ == "__main__":
    main()
