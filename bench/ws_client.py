"""Load client for the WebSocket benchmark (and idle-connection holder), one process.

``rtt``: ``--clients`` WebSockets each send a message and wait for its echo, over and
over. After ``--warmup`` seconds it prints ``measuring``, then after ``--seconds`` one
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

import aiohttp
from loops import new_loop
from yarl import URL

OPEN_CONCURRENCY = 100  # handshakes in flight while opening idle connections


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * percent / 100))]


async def rtt(url: str, clients: int, size: int, warmup: float, seconds: float) -> dict[str, float]:
    message = "x" * size
    latencies: list[float] = []
    phase = {"measuring": False, "stop": False}

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(url, autoping=True, max_msg_size=0) as ws:
            while not phase["stop"]:
                started = time.perf_counter()
                await ws.send_str(message)
                reply = await ws.receive()
                if reply.type is not aiohttp.WSMsgType.TEXT or len(reply.data) != size:
                    raise RuntimeError(f"unexpected reply {reply.type!r}")
                if phase["measuring"]:
                    latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        for task in tasks:
            if task.done():
                task.result()  # a client that failed: raise its error now
        print("measuring", flush=True)
        phase["measuring"] = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        phase["measuring"] = False
        elapsed = time.perf_counter() - started
        count = len(latencies)
        phase["stop"] = True
        await asyncio.gather(*tasks)
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
