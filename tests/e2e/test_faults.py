"""Faults under steady load, with real processes: a gateway process, backend processes killed
with SIGKILL, a real redis-server killed and restarted, routes.yaml overwritten, SIGTERM.

Every test drives a bounded, paced load (``RATE`` requests a second for a few seconds, each
request bounded by ``REQUEST_TIMEOUT``) and accounts for every request it sent: a status,
a response cut after its status line ("cut"), or an explicit client-side error such as a
refused connection. A request that hangs shows up as "timeout", and no test accepts one;
nor does any accept a 5xx the fault does not explain (DESIGN §5, §6, §8; issue 9).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import free_port, upstream, wait_for_port
from tests.redis_servers import RedisServer

from .conftest import GatewayProcess, StartGateway

ROOT = Path(__file__).resolve().parents[2]
RATE = 150  # requests a second
REQUEST_TIMEOUT = 15.0  # seconds: far beyond any answer these tests expect; reaching it is a hang


@dataclass(slots=True)
class Outcome:
    url: str
    started: float
    status: int | None = None
    error: str | None = None  # "timeout" (a hang), "cut" (body broken after the status line), or the error's name

    @property
    def kind(self) -> str:
        if self.error is None:
            return str(self.status)
        return f"{self.status} {self.error}" if self.status is not None else self.error


@dataclass
class Load:
    """Outcomes of a paced load: one per request sent, none missing."""

    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def tally(self) -> collections.Counter[str]:
        assert len(self.outcomes) == self.sent, "a request went unaccounted for"
        return collections.Counter(outcome.kind for outcome in self.outcomes)


async def paced_load(
    session: aiohttp.ClientSession, url: Callable[[int], str], *, seconds: float, method: str = "GET"
) -> Load:
    """``RATE`` requests a second for ``seconds`` (request ``n`` goes to ``url(n)``), all awaited."""
    load = Load()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)

    async def one(outcome: Outcome) -> None:
        try:
            async with session.request(method, outcome.url, timeout=timeout) as response:
                outcome.status = response.status
                await response.read()
        except TimeoutError:
            outcome.error = "timeout"
        except aiohttp.ClientPayloadError:
            outcome.error = "cut"
        except aiohttp.ClientError as exc:
            outcome.error = type(exc).__name__
        finally:
            load.outcomes.append(outcome)

    tasks = []
    started = time.monotonic()
    for n in range(int(RATE * seconds)):
        await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        tasks.append(asyncio.create_task(one(Outcome(url(n), time.monotonic()))))
        load.sent += 1
    await asyncio.gather(*tasks)
    return load


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400))


def stderr_of(gateway: GatewayProcess) -> str:
    """Stop the gateway (SIGTERM, bounded) and return everything it logged."""
    code = gateway.stop()
    assert code == 0, f"gateway exited with {code}"
    assert gateway.process.stderr is not None
    return gateway.process.stderr.read().decode()


def assert_clean(log: str) -> None:
    assert "Traceback" not in log, log
    assert "unhandled error" not in log, log


@dataclass
class BackendProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)


@pytest.fixture
def start_backend() -> Iterator[Callable[[], BackendProcess]]:
    """``start_backend()``: the test echo backend (``tests/backends.py``) as its own process; every
    one is stopped at teardown by its pid."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> BackendProcess:
        port = free_port()
        code = (
            "from aiohttp import web; from tests.backends import echo_app; "
            f"web.run_app(echo_app(), host='127.0.0.1', port={port}, print=None, access_log=None)"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        wait_for_port(port)
        return BackendProcess(process, port)

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# -- backends -----------------------------------------------------------------------------------


async def test_backend_killed_mid_response_gives_cuts_or_clean_502s_never_a_hang(
    start_gateway: StartGateway, start_backend: Callable[[], BackendProcess]
) -> None:
    backend = start_backend()
    gateway = start_gateway(
        f"""
defaults: {{auth: none, timeout: 5s}}
services:
  svc:
    upstreams: ["{backend.url}"]
    circuit_breaker: {{failures: 3, cooldown: 30s}}
"""
    )
    async with session() as client:
        # each response streams 4 chunks over ~0.15 s: at any moment some are mid-body
        running = asyncio.create_task(
            paced_load(client, lambda n: f"{gateway.url}/api/svc/stream/4?delay=0.05", seconds=3.0)
        )
        await asyncio.sleep(1.0)
        backend.kill()
        load = await running
        tally = load.tally()
        async with client.get(f"{gateway.url}/api/svc/stream/1") as after:
            assert after.status == 503  # the breaker took the dead upstream out
    assert set(tally) <= {"200", "200 cut", "502", "503"}, tally
    assert tally["200"] > 0 and tally["503"] > 0, tally
    assert_clean(stderr_of(gateway))


async def test_backend_slower_than_the_timeout_is_504_and_the_rest_are_served(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(
        f"""
defaults: {{auth: none, timeout: 300ms}}
services:
  svc: {{upstreams: ["{upstream(backend)}"]}}
"""
    )

    def url(n: int) -> str:  # one request in five is too slow
        return f"{gateway.url}/api/svc/slow/2" if n % 5 == 0 else f"{gateway.url}/api/svc/status/200"

    async with session() as client:
        load = await paced_load(client, url, seconds=3.0)
    slow = sum("/slow/" in outcome.url for outcome in load.outcomes)
    assert load.tally() == {"504": slow, "200": load.sent - slow}
    assert all(outcome.status == 504 for outcome in load.outcomes if "/slow/" in outcome.url)
    assert_clean(stderr_of(gateway))


async def test_one_of_two_upstreams_killed_costs_at_most_the_breaker_threshold(
    start_gateway: StartGateway, start_backend: Callable[[], BackendProcess]
) -> None:
    doomed, survivor = start_backend(), start_backend()
    gateway = start_gateway(
        f"""
defaults: {{auth: none, retries: 1}}
services:
  svc:
    upstreams: ["{doomed.url}", "{survivor.url}"]
    circuit_breaker: {{failures: 3, cooldown: 30s}}
"""
    )
    async with session() as client:
        running = asyncio.create_task(paced_load(client, lambda n: f"{gateway.url}/api/svc/echo/{n}", seconds=3.0))
        await asyncio.sleep(1.0)
        doomed.kill()
        load = await running
        tally = load.tally()
    failed = sum(count for kind, count in tally.items() if kind != "200")
    assert failed <= 3, tally  # retried on the survivor; at worst the requests it took to trip the breaker
    log = stderr_of(gateway)
    assert_clean(log)
    assert f"{doomed.url}" in log  # the breaker says which upstream it took out


# -- the store ----------------------------------------------------------------------------------


async def test_redis_killed_and_restarted_under_load_costs_no_request(
    start_gateway: StartGateway, backend: TestServer, restartable_redis: RedisServer
) -> None:
    gateway = start_gateway(
        f"""
store: {{url: "{restartable_redis.url}", on_error: allow, timeout: 100ms}}
defaults: {{auth: none, rate_limit: {{requests: 100000, per: 1m}}}}
services:
  limited: {{upstreams: ["{upstream(backend)}"]}}
  cached: {{upstreams: ["{upstream(backend)}"], rate_limit: off, cache: {{ttl: 1s}}}}
"""
    )

    def url(n: int) -> str:  # half rate-limited (a Redis call each), half cached (Redis reads and writes)
        return f"{gateway.url}/api/limited/status/200" if n % 2 else f"{gateway.url}/api/cached/echo/{n % 10}"

    async with session() as client:
        running = asyncio.create_task(paced_load(client, url, seconds=4.0))
        await asyncio.sleep(1.0)
        restartable_redis.stop(kill=True)
        await asyncio.sleep(1.0)
        restartable_redis.start()
        load = await running
        tally = load.tally()
        limited = await client.get(f"{gateway.url}/api/limited/status/200")
        limited.release()
    assert tally == {"200": load.sent}
    assert "X-RateLimit-Remaining" in limited.headers  # limiting is back, without a restart
    log = stderr_of(gateway)
    assert_clean(log)
    assert "rate-limit store unavailable (on_error: allow)" in log


# -- the config file ----------------------------------------------------------------------------


async def test_routes_yaml_replaced_by_binary_garbage_under_load_keeps_serving(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(f'defaults: {{auth: none}}\nservices:\n  svc: {{upstreams: ["{upstream(backend)}"]}}\n')
    assert gateway.config is not None
    async with session() as client:
        running = asyncio.create_task(paced_load(client, lambda n: f"{gateway.url}/api/svc/status/200", seconds=3.0))
        await asyncio.sleep(0.8)
        garbage = gateway.config.with_suffix(".tmp")
        garbage.write_bytes(b"\x00\xff\xfe garbage \x80\x81" + os.urandom(2048))
        os.replace(garbage, gateway.config)  # as an editor or a config-map update replaces it

        async def reload_errors() -> list[object]:
            async with client.get(gateway.admin_url + "/config") as response:
                errors: list[object] = (await response.json())["reload"]["errors"]
                return errors

        deadline = time.monotonic() + 10
        while not await reload_errors():
            assert time.monotonic() < deadline, "the garbage was not noticed"
            await asyncio.sleep(0.05)
        load = await running
        tally = load.tally()
    assert tally == {"200": load.sent}
    log = stderr_of(gateway)
    assert_clean(log)
    assert "config reload (file) failed; still serving version" in log


# -- the gateway process itself -----------------------------------------------------------------


async def test_sigterm_under_load_drains_what_was_in_flight_and_refuses_the_rest_cleanly(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(f'defaults: {{auth: none}}\nservices:\n  svc: {{upstreams: ["{upstream(backend)}"]}}\n')
    async with session() as client:
        running = asyncio.create_task(paced_load(client, lambda n: f"{gateway.url}/api/svc/slow/2", seconds=3.0))
        await asyncio.sleep(2.5)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.process.wait, 15)
        load = await running
        tally = load.tally()
    assert code == 0
    # every request either got its answer or an explicit connection error; none hung, none got a 5xx
    assert set(tally) <= {"200", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}, tally
    in_flight = [o for o in load.outcomes if o.started < signalled - 1.5]  # surely inside the gateway by then
    assert in_flight and all(o.kind == "200" for o in in_flight), collections.Counter(o.kind for o in in_flight)
    assert gateway.process.stderr is not None
    assert_clean(gateway.process.stderr.read().decode())


async def test_slow_clients_are_cut_without_holding_back_a_steady_load(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(
        f"""
limits: {{header_timeout: 1s, body_timeout: 1s}}
defaults: {{auth: none}}
services:
  svc: {{upstreams: ["{upstream(backend)}"]}}
"""
    )

    async def slow_client(n: int) -> bytes:
        """A head (or, for odd n, a body) that trickles a byte every 0.2 s for up to 20 s."""
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            if n % 2:
                writer.write(b"POST /api/svc/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"GET /api/svc/echo HTTP/1.1\r\n")
            answer = bytearray()
            for _ in range(100):
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), timeout=0.2)
                except TimeoutError:
                    writer.write(b"x")
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answer += chunk
            return bytes(answer)
        finally:
            writer.close()

    async with session() as client:
        slow = [asyncio.create_task(slow_client(n)) for n in range(100)]
        load = await paced_load(client, lambda n: f"{gateway.url}/api/svc/status/200", seconds=3.0)
        answers = await asyncio.gather(*slow)
    assert load.tally() == {"200": load.sent}
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), [a[:40] for a in answers]
    log = stderr_of(gateway)
    assert_clean(log)
    assert log.count("(408)") == 100
