"""In-process cost of rate limiting: one request through ``RateLimitMiddleware``, in CPU µs.

The limit of the ``gateway-rl-*`` targets (10⁹ per second: never rejects) on the memory
store and on a ``redis-server`` this script starts (pinned to CPU 0, stopped by pid).
``CONCURRENCY`` tasks call the middleware at once, as 64 connections would; the figure is
this process's CPU time (``time.process_time``) per request, so the Redis server's own
time and the wait for its answer are not in it. Prints one JSON object; ``run.py`` runs it
pinned to the server CPU.

    .venv/bin/python bench/rl_verify.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.config import StoreConfig
from gateway.stores import open_store
from middleware.base import CLIENT_IP, OUTCOME, Outcome, Store
from middleware.rate_limit import RateLimitConfig, RateLimitMiddleware

CONCURRENCY = 64
LIMIT = RateLimitConfig(requests=1_000_000_000, per=1.0, key="ip")


async def _ok(_request: web.Request) -> web.StreamResponse:
    return web.Response()


async def cpu_us_per_call(store: Store, calls: int) -> float:
    middleware = RateLimitMiddleware(LIMIT, store=store, scope="bench", on_error="deny")
    per_task = max(1, calls // CONCURRENCY)

    def new_request() -> web.Request:
        request = make_mocked_request("GET", "/")  # a mock: slow to build, so built before the clock starts
        request[CLIENT_IP] = "127.0.0.1"
        request[OUTCOME] = Outcome()
        return request

    async def worker(request: web.Request) -> None:
        for _ in range(per_task):
            response = await middleware(request, _ok)
            if response.status != 200:
                raise RuntimeError(f"the limit answered {response.status}")

    requests = [new_request() for _ in range(CONCURRENCY)]
    await worker(requests[0])  # connect, load the script, warm up
    started = time.process_time()
    await asyncio.gather(*(worker(request) for request in requests))
    return (time.process_time() - started) / (per_task * CONCURRENCY) * 1e6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def measure(calls: int, redis_port: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, url in (("memory", "memory://"), ("redis", f"redis://127.0.0.1:{redis_port}/0")):
        store = open_store(StoreConfig(url=url, timeout=1.0))
        try:
            results[name] = await cpu_us_per_call(store, calls)
        finally:
            await store.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("rl_verify.py: no redis-server (bash bench/setup.sh installs it)")
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        argv = ["taskset", "-c", "0", binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", work]  # fmt: skip
        redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            print(json.dumps(asyncio.run(measure(args.calls, port))))
        finally:
            redis.terminate()
            try:
                redis.wait(10)
            except subprocess.TimeoutExpired:
                redis.kill()
                redis.wait()


if __name__ == "__main__":
    main()
