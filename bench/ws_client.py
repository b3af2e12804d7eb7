"""Load client for the WebSocket benchmark (and idle-connection holder), one process.

``rtt``: ``--clients`` WebSockets each send a message and wait for its echo, over and
over, on asyncio Protocols (``ws_wire.py``: the frames themselves, one masked message
built once, its mask reused; no aiohttp on this path, whose per-message task wake-ups
saturated the load core in relay runs). After ``--warmup`` seconds it prints ``measuring``, then after ``--seconds`` one
JSON line: round trips, round trips/s, p50/p99 ms. The harness starts its CPU meter on
``measuring`` and reads it on the JSON line.

``hold-ws`` / ``hold-http``: open ``--count`` WebSockets (or keep-alive HTTP connections,
each having made one GET) and keep them idle; print ``open <n>`` once all are open, then
wait until stdin closes or SIGTERM. The harness reads the proxy's RSS meanwhile.

Runs on uvloop when installed; raises its own open-files limit to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
from typing import cast

import aiohttp
from loops import new_loop
from ws_wire import TEXT, accept_key, frame, header_fields, new_key, split_frames, upgrade_request
from yarl import URL

OPEN_CONCURRENCY = 100  # handshakes in flight while opening idle connections


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * percent / 100))]


class RoundTrips(asyncio.Protocol):
    """One socket of ``rtt``: after the upgrade, a message out, its echo in, the next out at once."""

    def __init__(self, message: bytes, size: int, latencies: list[float], phase: dict[str, bool]) -> None:
        self.message = message  # the whole frame, masked (one mask per socket: see ws_wire.py)
        self.size = size
        self.latencies = latencies
        self.phase = phase
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.key = new_key()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            first, fields = header_fields(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
            if (
                not first.startswith(b"HTTP/1.1 101")
                or fields.get(b"sec-websocket-accept") != accept_key(self.key).encode()
            ):
                self.fail(RuntimeError(f"upgrade refused: {first!r}"))
                return
            self.upgraded.set_result(None)
            self.send()
        for _fin, opcode, payload in split_frames(self.buffer):
            if opcode != TEXT or len(payload) != self.size:
                self.fail(RuntimeError(f"unexpected reply: opcode {opcode}, {len(payload)} bytes"))
                return
            if self.phase["measuring"]:
                self.latencies.append(time.perf_counter() - self.sent_at)
            if self.phase["stop"]:
                self.fail(None)
                return
            self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.message)

    def fail(self, error: Exception | None) -> None:
        for future in (self.upgraded, self.ended):
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.fail(RuntimeError(f"connection lost: {exc}"))


async def rtt(url: str, clients: int, size: int, warmup: float, seconds: float) -> dict[str, float]:
    """Round trips on ``clients`` sockets, spoken at the frame level (``ws_wire.py``): a round trip
    costs this process one write and one read, so the load core has room for the relay's pace."""
    target = URL(url)
    host, port = target.host or "127.0.0.1", target.port or 80
    message = frame(TEXT, b"x" * size, masked=True)
    latencies: list[float] = []
    phase = {"measuring": False, "stop": False}
    loop = asyncio.get_running_loop()
    sockets: list[RoundTrips] = []
    for _ in range(clients):
        transport, socket = await loop.create_connection(
            lambda: RoundTrips(message, size, latencies, phase), host, port
        )
        transport.write(upgrade_request(host, port, target.raw_path_qs, socket.key))
        sockets.append(socket)
    await asyncio.gather(*(socket.upgraded for socket in sockets))
    await asyncio.sleep(warmup)
    for socket in sockets:
        if socket.ended.done():
            socket.ended.result()  # a socket that failed: raise its error now
    print("measuring", flush=True)
    phase["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    phase["measuring"] = False
    elapsed = time.perf_counter() - started
    count = len(latencies)
    phase["stop"] = True
    await asyncio.gather(*(socket.ended for socket in sockets))
    latencies.sort()
    return {
        "round_trips": count,
        "rate": count / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


async def _until_released() -> None:
    """Until stdin closes (the harness is gone or done) or SIGTERM."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = asyncio.create_task(reader.read())
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait({eof, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in (eof, waiter):
        task.cancel()


async def hold_ws(url: str, count: int) -> None:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def open_one() -> None:
            async with gate:
                sockets.append(await session.ws_connect(url, autoping=True, heartbeat=None))

        await asyncio.gather(*(open_one() for _ in range(count)))
        print(f"open {len(sockets)}", flush=True)
        await _until_released()
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()


async def hold_http(url: str, count: int) -> None:
    target = URL(url)
    request = (
        f"GET {target.raw_path_qs} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    held: list[asyncio.StreamWriter] = []

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response {head[:80]!r}")
            lines = head.lower().split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:"))
            await reader.readexactly(length)
            held.append(writer)

    await asyncio.gather(*(open_one() for _ in range(count)))
    print(f"open {len(held)}", flush=True)
    await _until_released()
    for writer in held:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("rtt", "hold-ws", "hold-http"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="bytes per text message")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    raise_nofile()
    _, loop = new_loop()
    try:
        if args.mode == "rtt":
            result = loop.run_until_complete(rtt(args.url, args.clients, args.size, args.warmup, args.seconds))
            print(json.dumps(result), flush=True)
        elif args.mode == "hold-ws":
            loop.run_until_complete(hold_ws(args.url, args.count))
        else:
            loop.run_until_complete(hold_http(args.url, args.count))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
