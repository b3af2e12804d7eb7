"""The live dashboard in a real headless Chromium, driven over the DevTools protocol (DESIGN §8).

Chromium comes from Debian (``make test`` installs the ``chromium`` package when it is
missing). The page must show numbers that move while traffic flows; the test saves a
screenshot, and with ``GATEWAY_SCREENSHOT=path`` it also writes it there (how
``docs/dashboard.png`` is made).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import free_port, upstream, wait_for_port
from tests.e2e.conftest import GatewayProcess, StartGateway

YAML = """
defaults: {{auth: none}}
services:
  users:
    upstreams: ["{upstream}"]
    rate_limit: {{requests: 40, per: 1s}}
  orders:
    upstreams: ["{upstream}"]
    cache: {{ttl: 1m}}
  legacy:
    upstreams: ["http://127.0.0.1:1"]
    retries: 0
"""
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900",
)  # fmt: skip


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[int]:
    """A headless Chromium with its DevTools port; the whole process group is stopped at teardown."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (make test installs the Debian package)")
    port = free_port()
    process = subprocess.Popen(
        [binary, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderers and helpers share our process group id: its pid
    )
    try:
        wait_for_port(port, timeout=20)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        await self._ws.send_json({"id": number, "method": method, "params": params})
        async with asyncio.timeout(15):
            while True:
                message = json.loads(await self._ws.receive_str())
                if message.get("id") == number:
                    if "error" in message:
                        raise AssertionError(f"{method}: {message['error']}")
                    result: dict[str, Any] = message["result"]
                    return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def page(session: aiohttp.ClientSession, port: int) -> AsyncIterator[DevTools]:
    async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as response:
        target = await response.json()
    async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        yield DevTools(ws)


async def traffic(session: aiohttp.ClientSession, gateway: GatewayProcess, stop: asyncio.Event) -> None:
    """About 150 requests a second: mostly fine, some 404s, 429s and a dead upstream."""
    orders = [f"/api/orders/slow/0.0{n}" for n in range(1, 4)]  # cached after the first of each
    paths = ["/api/users/echo/a"] * 6 + orders + ["/api/legacy/x", "/api/nowhere/x"]

    async def one(path: str) -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(gateway.url + path) as response:
                await response.read()

    tasks = set()
    for path in itertools.cycle(paths):
        if stop.is_set():
            break
        task = asyncio.create_task(one(path))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(1 / 150)
    await asyncio.gather(*tasks)


STATE = """(() => {
  const row = (name) => { const r = document.querySelector(`tr[data-service="${name}"]`);
    return r ? Array.from(r.cells).map((c) => c.textContent) : null; };
  return { frames: Number(document.body.dataset.frames || 0), rps: document.getElementById("rps").textContent,
           users: row("users"), orders: row("orders"), mix: document.getElementById("mix").textContent,
           limited: document.getElementById("ratelimited").textContent,
           cache: document.getElementById("cache").textContent,
           upstreams: document.getElementById("upstreams").textContent,
           conn: document.getElementById("conn").textContent };
})()"""


async def test_dashboard_numbers_move_while_traffic_flows(
    start_gateway: StartGateway, backend: TestServer, chromium: int, tmp_path: Path
) -> None:
    gateway = start_gateway(YAML.format(upstream=upstream(backend)))
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session, page(session, chromium) as tab:
        load = asyncio.create_task(traffic(session, gateway, stop))
        try:
            await tab.call("Page.enable")
            await tab.call(
                "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
            )
            await tab.call("Page.navigate", url=gateway.admin_url + "/")
            states = []
            deadline = time.monotonic() + 15
            while len(states) < 3:
                assert time.monotonic() < deadline, f"the page did not update: {states}"
                state = await tab.evaluate(STATE)
                if state and state["users"] is not None and (not states or state["frames"] > states[-1]["frames"]):
                    states.append(state)
                await asyncio.sleep(1.0)
            shot = await tab.call("Page.captureScreenshot", format="png")
        finally:
            stop.set()
            await load
    first, last = states[0], states[-1]
    assert last["conn"] == "live"
    assert float(last["rps"]) > 20
    assert int(last["users"][4]) > int(first["users"][4])  # the users total keeps growing
    assert last["users"][2][0].isdigit() and last["orders"][3][0].isdigit()  # p50 / p99 shown
    assert "2xx" in last["mix"] and "4xx" in last["mix"]
    assert int(last["limited"]) > 0
    assert last["cache"].endswith("%") and float(last["cache"][:-1]) > 50
    assert "legacy → http://127.0.0.1:1" in last["upstreams"]
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    save(png, tmp_path / "dashboard.png", os.environ.get("GATEWAY_SCREENSHOT"))


def save(png: bytes, *paths: Path | str | None) -> None:
    for path in paths:
        if path:
            Path(path).write_bytes(png)
