"""What the depth of a coroutine chain costs a request's waits (bench/README.md, twelfth session).

A request through the full chain waits four or five times (its Redis take, its lookup, the
upstream's answer, its write), and each time it resumes, the resumption passes through every
coroutine frame between aiohttp's handler task and the wait. This awaits a future resolved by
``call_soon`` five times, under ``depth`` nested coroutines, on uvloop, and prints the CPU time of
the five waits: the difference between depth 12 and depth 0 is what the chain's depth costs.

    taskset -c 1 .venv/bin/python bench/await_depth.py
"""

from __future__ import annotations

import asyncio
import time

import uvloop

REPEATS = 10_000
WAITS = 5


async def waits(loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(WAITS):
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future


async def nested(depth: int, loop: asyncio.AbstractEventLoop) -> None:
    if depth == 0:
        return await waits(loop)
    return await nested(depth - 1, loop)


async def main() -> None:
    loop = asyncio.get_running_loop()
    for depth in (0, 12, 0, 12):
        started = time.process_time()
        for _ in range(REPEATS):
            await nested(depth, loop)
        elapsed = time.process_time() - started
        print(f"depth {depth:2d}: {elapsed / REPEATS * 1e6:.2f} µs of CPU for {WAITS} waits")


if __name__ == "__main__":
    uvloop.run(main())
