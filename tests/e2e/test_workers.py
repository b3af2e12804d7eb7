"""``gateway run --workers N``: supervision, metrics across workers, SIGHUP to all, bounded drain (DESIGN §2, §8)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import psutil
from aiohttp.test_utils import TestServer

from gateway.metrics import REFRESH_EVERY
from tests.conftest import free_port, upstream
from tests.e2e.conftest import GatewayProcess, StartGateway, gateway_command

YAML = """
limits: {{drain_timeout: {drain}}}
defaults: {{auth: none}}
services:
  svc:
    upstreams: ["{upstream}"]
"""


def workers(gateway: GatewayProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(gateway.process.pid).children())


def wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def fresh_session() -> aiohttp.ClientSession:
    """A new connection per request, so SO_REUSEPORT spreads them over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def statuses(url: str, count: int) -> list[int]:
    async with fresh_session() as session:

        async def one() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def scrape(gateway: GatewayProcess) -> float:
    """``gateway_requests_total`` for svc as one scrape (any worker) reports it."""
    async with fresh_session() as session, session.get(gateway.admin_url + "/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{") and 'service="svc"' in line
    )


async def scrape_once_folded(gateway: GatewayProcess, expected: float) -> float:
    """A scrape after every worker has added its tally to the shared files (once a second):
    the first one reporting ``expected``, or the last tried after three seconds."""
    for _ in range(int(3 * REFRESH_EVERY / 0.1)):
        if (total := await scrape(gateway)) == expected:
            break
        await asyncio.sleep(0.1)
    return total


async def test_workers_share_metrics_survive_a_crash_and_reload_together(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(YAML.format(upstream=upstream(backend), drain="5s"), "--workers", "2")
    wait_until(lambda: len(workers(gateway)) == 2)
    assert await statuses(f"{gateway.url}/api/svc/echo/x", 40) == [200] * 40
    assert await scrape_once_folded(gateway, 40.0) == 40.0
    assert [await scrape(gateway) for _ in range(6)] == [40.0] * 6  # every worker reports the sum

    victim = workers(gateway)[0]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    wait_until(lambda: (now := workers(gateway)) and len(now) == 2 and victim not in now)
    await asyncio.sleep(0.3)  # the new worker binds its sockets
    assert await statuses(f"{gateway.url}/api/svc/echo/x", 10) == [200] * 10
    assert await scrape_once_folded(gateway, 50.0) == 50.0  # the dead worker's counts are kept

    assert gateway.config is not None
    gateway.config.write_text(gateway.config.read_text().replace("svc:", "svc2:"))
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 3
    while set(await statuses(f"{gateway.url}/api/svc2/echo/x", 20)) != {200}:
        assert time.monotonic() < deadline, "not every worker reloaded"
        await asyncio.sleep(0.1)

    assert gateway.stop() == 0
    assert gateway.process.stderr is not None
    log = gateway.process.stderr.read().decode()
    assert f"(pid {victim}) exited with signal SIGKILL; starting it again" in log
    assert log.count("config reloaded (SIGHUP)") == 2
    assert "supervisor stopped" in log


async def test_sigterm_drains_in_flight_requests_within_the_drain_timeout(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(YAML.format(upstream=upstream(backend), drain="1s"), "--workers", "2")
    wait_until(lambda: len(workers(gateway)) == 2)
    async with aiohttp.ClientSession() as session, fresh_session() as slow_session:
        quick = asyncio.create_task(session.get(f"{gateway.url}/api/svc/slow/0.5"))
        slow = asyncio.create_task(slow_session.get(f"{gateway.url}/api/svc/slow/30"))
        await asyncio.sleep(0.2)  # both in flight
        began = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        response = await quick
        assert response.status == 200  # finished during the drain
        assert await response.text() == "slept 0.5\n"
        code = await asyncio.to_thread(gateway.process.wait, 10)
        elapsed = time.monotonic() - began
        try:
            await slow
        except aiohttp.ClientError:
            pass  # cut off when the drain time ran out
    assert code == 0
    assert elapsed < 4, f"drain took {elapsed:.1f}s with drain_timeout 1s"


def test_a_busy_admin_port_is_a_clean_error(tmp_path: Path, backend: TestServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "routes.yaml"
        config.write_text(
            f"admin: {{host: 127.0.0.1, port: {port}}}\n" + YAML.format(upstream=upstream(backend), drain="1s")
        )
        result = subprocess.run(
            gateway_command(config, free_port()), capture_output=True, text=True, timeout=20, check=False
        )
    assert result.returncode == 1
    assert f"gateway: cannot serve on 127.0.0.1:{port} (admin listener): Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
