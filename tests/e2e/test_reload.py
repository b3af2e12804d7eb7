"""Hot reload of a running gateway process under steady load (DESIGN §8)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.conftest import upstream
from tests.e2e.conftest import GatewayProcess, StartGateway

YAML = """
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
    rate_limit: {{requests: 100000, per: 1m}}
{extra}"""
RATE = 200  # requests per second of steady load


def replace(path: Path, text: str) -> None:
    """Write the way editors do: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def steady_load(session: aiohttp.ClientSession, url: str, seconds: float) -> tuple[int, list[str]]:
    """``RATE`` requests a second for ``seconds``; returns (requests sent, failures)."""
    failures: list[str] = []

    async def one() -> None:
        try:
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    failures.append(f"status {response.status}")
        except aiohttp.ClientError as exc:
            failures.append(repr(exc))

    tasks = []
    started = time.monotonic()
    for n in range(int(RATE * seconds)):
        await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return len(tasks), failures


async def admin_json(session: aiohttp.ClientSession, gateway: GatewayProcess, path: str) -> dict[str, object]:
    async with session.get(gateway.admin_url + path) as response:
        body: dict[str, object] = await response.json()
        return body


async def test_broken_then_fixed_file_under_load(start_gateway: StartGateway, backend: TestServer) -> None:
    base = upstream(backend)
    gateway = start_gateway(YAML.format(upstream=base, extra=""))
    assert gateway.config is not None
    header = gateway.config.read_text().splitlines()[0] + "\n"  # the admin: line the fixture added
    async with aiohttp.ClientSession() as session:
        load = asyncio.create_task(steady_load(session, f"{gateway.url}/api/svc/echo/x", 4.0))
        await asyncio.sleep(0.8)
        gateway.config.write_text(header + YAML.format(upstream=base, extra="  broken: {upstreams: [}\n"))
        deadline = time.monotonic() + 3
        while not (await admin_json(session, gateway, "/config"))["reload"]["errors"]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the broken file was not noticed"
            await asyncio.sleep(0.05)
        extra = f'  fresh:\n    upstreams: ["{base}"]\n'
        replace(gateway.config, header + YAML.format(upstream=base, extra=extra))
        fixed_at = time.monotonic()
        while True:
            async with session.get(f"{gateway.url}/api/fresh/echo/y") as response:
                if response.status == 200:
                    break
                assert response.status == 404
            assert time.monotonic() - fixed_at < 2.0, "the new service is not live within 2 s"
            await asyncio.sleep(0.02)
        sent, failures = await load
        config = await admin_json(session, gateway, "/config")
        async with session.get(gateway.admin_url + "/metrics") as response:
            metrics = await response.text()
    assert sent == 4 * RATE
    assert failures == []
    reload = config["reload"]
    assert reload["last_result"] == "success" and reload["errors"] == []  # type: ignore[index]
    assert reload["changes"] == {"added": ["fresh"], "removed": [], "changed": []}  # type: ignore[index]
    assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
    assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
    assert gateway.stop() == 0
    assert gateway.process.stderr is not None
    log = gateway.process.stderr.read().decode()
    assert "config reload (file) failed; still serving version" in log
    assert f"  {gateway.config}:" in log and "invalid YAML" in log  # the located error
    assert "added fresh" in log


async def test_sighup_reloads(start_gateway: StartGateway, backend: TestServer) -> None:
    base = upstream(backend)
    gateway = start_gateway(YAML.format(upstream=base, extra=""))
    assert gateway.config is not None
    text = gateway.config.read_text().replace("svc:", "renamed:")
    gateway.config.write_text(text)
    gateway.process.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 2
        while True:
            async with session.get(f"{gateway.url}/api/renamed/echo/x") as response:
                if response.status == 200:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        async with session.get(f"{gateway.url}/api/svc/echo/x") as response:
            assert response.status == 404
    assert gateway.stop() == 0
    assert gateway.process.stderr is not None
    log = gateway.process.stderr.read().decode()
    assert "config reloaded (SIGHUP)" in log
    assert "added renamed, removed svc" in log
