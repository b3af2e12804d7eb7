"""Soak: mixed traffic through one gateway process for a bounded time, watching its resources.

Starts a ``redis-server``, two example "users" backends, the example "chat" backend and a
``gateway run`` (one process) with plain, cached, rate-limited and authenticated routes and
a WebSocket service; drives a steady mix of traffic at it for ``--duration`` seconds; and
every ``--interval`` seconds samples the gateway's RSS and open file descriptors (from
/proc) and its asyncio task count and event-loop lag (``gateway_asyncio_tasks`` and
``gateway_event_loop_lag_seconds`` on the admin ``/metrics``). Prints one row per sample,
then whether each resource is flat after ``--warmup``, then the same figures once the
traffic has stopped (connections closed, tasks gone).

The mix (shares of ``--rate``, 150 requests a second by default):

- 30% plain ``GET /api/users/health`` and 5% ``PUT /api/users/users/1`` with a JSON body;
- 20% cached ``GET /api/users/public/info`` (ttl 2 s, so misses keep coming);
- 20% rate-limited ``GET /api/users/users/<n>``, 5 a second per ``X-Client``: a greedy
  client sends a quarter of them and gets 429s, the 50 others stay under their budget;
- 20% authenticated ``GET /api/users/whoami``: valid tokens, plus a few missing and forged
  ones (401);
- 5% refused before any upstream: unknown service (404), unsafe path (400), oversized
  header (431);
- WebSocket: ``--ws-clients`` sockets in rooms of 10, each saying something every 2 s
  and reading the room, plus ``--ws-churn`` short-lived sockets a second (open, say, close);
- slow clients: 2 connections a second that trickle a request head until the gateway cuts
  them at ``limits.header_timeout`` (2 s here).

Not run in CI; ``python bench/soak.py --duration 120``. Needs ``redis-server`` on PATH.
Every process it starts is stopped by its pid on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
from yarl import URL

ROOT = Path(__file__).resolve().parents[1]
SECRET = "soak-secret-" + "0123456789abcdef" * 4
ROOM_SIZE = 10


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Processes:
    """Everything started, stopped by pid (SIGTERM, then SIGKILL) in reverse order."""

    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> int:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started.append((name, process))
        return process.pid

    def stop(self) -> None:
        for _name, process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _name, process in reversed(self.started):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@dataclass(frozen=True)
class Setup:
    gateway_pid: int
    port: int
    admin_port: int
    workdir: Path
    peers: dict[int, str]  # remote port -> what listens there


def start_everything(processes: Processes, workdir: Path) -> Setup:
    redis = shutil.which("redis-server")
    if redis is None:
        sys.exit("soak: redis-server is not installed (apt-get install -y redis-server)")
    redis_port, users, chat, port, admin_port = free_port(), [free_port(), free_port()], free_port(), free_port(), 0
    admin_port = free_port()
    peers = {redis_port: "redis", users[0]: "users", users[1]: "users", chat: "chat"}
    processes.start(
        "redis",
        [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        log=workdir / "redis.log",
    )
    for n, users_port in enumerate(users):
        processes.start(
            f"users{n}",
            [sys.executable, "-m", "examples.users", "--port", str(users_port), "--name", f"users{n}"],
            log=workdir / f"users{n}.log",
        )
    processes.start("chat", [sys.executable, "-m", "examples.chat", "--port", str(chat)], log=workdir / "chat.log")
    for backend in [redis_port, *users, chat]:
        wait_for_port(backend)
    config = workdir / "routes.yaml"
    upstreams = ", ".join(f"http://127.0.0.1:{p}" for p in users)
    config.write_text(
        f"""\
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
store: {{url: "redis://127.0.0.1:{redis_port}/0", on_error: allow}}
limits: {{header_timeout: 2s, body_timeout: 2s}}
jwt:
  algorithms: [HS256]
  secret: ${{JWT_SECRET}}
  claims_headers: {{sub: X-User-Id}}
defaults: {{auth: none, rate_limit: off, timeout: 10s}}
services:
  users:
    upstreams: [{upstreams}]
    routes:
      - {{path: /public/*, cache: {{ttl: 2s}}}}
      - {{path: /whoami, auth: required}}
      - {{path: /users/*, methods: [GET], rate_limit: {{requests: 5, per: 1s, key: "header:X-Client"}}}}
  chat:
    upstreams: ["http://127.0.0.1:{chat}"]
    auth: required
    websocket: true
"""
    )
    env = {**os.environ, "JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    gateway = [sys.executable, "-m", "gateway", "run", "-c", str(config)]
    pid = processes.start("gateway", gateway, log=workdir / "gateway.log", env=env)
    wait_for_port(port)
    wait_for_port(admin_port)
    return Setup(pid, port, admin_port, workdir, peers)


# -- traffic ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the traffic got, since the last sample and in all."""

    statuses: Counter[str] = field(default_factory=Counter)  # "2xx", "429", "5xx", ...
    errors: Counter[str] = field(default_factory=Counter)  # client-side: exception names
    skipped: int = 0  # requests not sent because too many were still in flight
    ws_messages: int = 0
    driver_lag: float = 0.0  # seconds: the worst lateness of this process's own loop (is the driver keeping up?)

    def count(self, status: int) -> None:
        key = str(status) if status in (101, 400, 401, 404, 408, 429, 431) else f"{status // 100}xx"
        self.statuses[key] += 1

    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


class Traffic:
    def __init__(self, setup: Setup, rate: float, ws_clients: int, ws_churn: float) -> None:
        self.base = f"http://127.0.0.1:{setup.port}"
        self.port = setup.port
        self.rate = rate
        self.ws_clients = ws_clients
        self.ws_churn = ws_churn
        self.now = Tally()
        self.total = Tally()
        self.tokens = [token(f"user{n}") for n in range(20)]
        self.forged = token("mallory")[:-4] + "AAAA"
        self.in_flight = 0
        self.stopping = asyncio.Event()

    def record(self, status: int | None = None, error: str | None = None) -> None:
        for tally in (self.now, self.total):
            if status is not None:
                tally.count(status)
            if error is not None:
                tally.errors[error] += 1

    def request(self, n: int) -> tuple[str, str, dict[str, str], bytes | None]:
        """The ``n``-th request of the mix: method, path, headers, body."""
        slot = n % 20
        if slot < 6:
            return "GET", "/api/users/health", {}, None
        if slot == 6:
            return (
                "PUT",
                "/api/users/users/1",
                {"Content-Type": "application/json"},
                b'{"name":"alice","email":"alice@example.com"}',
            )
        if slot < 11:
            return "GET", "/api/users/public/info", {}, None
        if slot < 15:
            client = "greedy" if slot == 14 else f"client{n % 50}"
            return "GET", f"/api/users/users/{n % 3 + 1}", {"X-Client": client}, None
        if slot < 19:
            if n % 50 == 15:
                return "GET", "/api/users/whoami", {}, None  # no token: 401
            if n % 50 == 16:
                return "GET", "/api/users/whoami", {"Authorization": f"Bearer {self.forged}"}, None
            return "GET", "/api/users/whoami", {"Authorization": f"Bearer {self.tokens[n % 20]}"}, None
        kind = (n // 20) % 3
        if kind == 0:
            return "GET", "/api/nowhere/x", {}, None
        if kind == 1:
            return "GET", "/api/users/%2e%2e/%2e%2e/etc/passwd", {}, None
        return "GET", "/api/users/health", {"X-Big": "a" * 20000}, None

    async def http(self, session: aiohttp.ClientSession, n: int) -> None:
        method, path, headers, body = self.request(n)
        self.in_flight += 1
        try:
            url = URL(self.base + path, encoded=True)  # sent as written: %2e%2e stays for the gateway to refuse
            async with session.request(method, url, headers=headers, data=body) as response:
                await response.read()
                self.record(status=response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.record(error=type(exc).__name__)
        finally:
            self.in_flight -= 1

    async def http_load(self, session: aiohttp.ClientSession) -> None:
        tasks: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        for n in itertools.count():
            if self.stopping.is_set():
                break
            await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            if self.in_flight >= 500:  # bounded: a stalled gateway shows up as skipped, not as memory here
                self.now.skipped += 1
                self.total.skipped += 1
                continue
            task = asyncio.create_task(self.http(session, n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def ws_member(self, session: aiohttp.ClientSession, n: int) -> None:
        room = f"soak{n // ROOM_SIZE}"
        url = f"{self.base}/api/chat/rooms/{room}?access_token={self.tokens[n % 20]}"
        while not self.stopping.is_set():
            try:
                async with session.ws_connect(url, heartbeat=None) as ws:
                    reader = asyncio.create_task(self._drain(ws))
                    try:
                        while not self.stopping.is_set():
                            await ws.send_str(f"hello from {n}")
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self.stopping.wait(), timeout=2.0)
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.record(error=f"ws {type(exc).__name__}")
                await asyncio.sleep(1.0)

    async def _drain(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.now.ws_messages += 1
                self.total.ws_messages += 1

    async def ws_churn_load(self, session: aiohttp.ClientSession) -> None:
        async def once(n: int) -> None:
            url = f"{self.base}/api/chat/rooms/churn{n % 5}?access_token={self.tokens[n % 20]}"
            try:
                async with asyncio.timeout(10), session.ws_connect(url, heartbeat=None) as ws:
                    await ws.receive()  # welcome
                    await ws.send_str("passing through")
                    await ws.receive()
                    await ws.close()
                self.record(status=101)
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                self.record(error=f"ws {type(exc).__name__}")

        tasks: set[asyncio.Task[None]] = set()
        for n in itertools.count():
            if self.stopping.is_set():
                break
            task = asyncio.create_task(once(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=1 / self.ws_churn)
        await asyncio.gather(*tasks)

    async def slow_clients(self) -> None:
        async def one() -> None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.record(error=f"slow {type(exc).__name__}")
                return
            try:
                writer.write(b"GET /api/users/health HTTP/1.1\r\n")
                async with asyncio.timeout(15):
                    while True:
                        try:
                            answer = await asyncio.wait_for(reader.read(4096), timeout=0.5)
                        except TimeoutError:
                            writer.write(b"X")  # one more byte of a header name that never ends
                            continue
                        break
                self.record(status=408 if answer.startswith(b"HTTP/1.1 408") else 0)
            except (TimeoutError, OSError) as exc:
                self.record(error=f"slow {type(exc).__name__}")
            finally:
                writer.close()

        tasks: set[asyncio.Task[None]] = set()
        while not self.stopping.is_set():
            for _ in range(2):
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=1.0)
        await asyncio.gather(*tasks)

    async def watch_own_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            late = loop.time() - due
            self.now.driver_lag = max(self.now.driver_lag, late)
            self.total.driver_lag = max(self.total.driver_lag, late)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(
                self.http_load(session),
                self.ws_churn_load(session),
                self.slow_clients(),
                self.watch_own_loop(),
                *(self.ws_member(session, n) for n in range(self.ws_clients)),
            )


# -- sampling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the traffic started
    rss_kib: int
    fds: int
    tasks: int
    lag_ms: float
    websockets: int
    in_flight: int  # HTTP requests the driver had sent and not yet seen answered
    tally: Tally


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_peers(pid: int, peers: dict[int, str]) -> Counter[str]:
    """The process's TCP sockets by what is at the other end (from /proc/PID/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    listening = fields[3] == "0A"
                    found["listening" if listening else peers.get(remote_port, "clients")] += 1
    return found


async def gauges(session: aiohttp.ClientSession, admin_port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        text = await response.text()
    wanted = ("gateway_asyncio_tasks", "gateway_event_loop_lag_seconds", "gateway_websocket_connections")
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


async def sample(session: aiohttp.ClientSession, setup: Setup, at: float, tally: Tally, in_flight: int = 0) -> Sample:
    values = await gauges(session, setup.admin_port)
    return Sample(
        at=at,
        rss_kib=proc_rss_kib(setup.gateway_pid),
        fds=proc_fds(setup.gateway_pid),
        tasks=int(values.get("gateway_asyncio_tasks", -1)),
        lag_ms=values.get("gateway_event_loop_lag_seconds", -1) * 1000,
        websockets=int(values.get("gateway_websocket_connections", -1)),
        in_flight=in_flight,
        tally=tally,
    )


HEADER = (
    f"{'t (s)':>6} {'req/s':>6} {'2xx':>6} {'4xx':>6} {'5xx':>4} {'err':>4} {'ws msg/s':>8} "
    f"{'in flight':>9} {'RSS MiB':>8} {'fds':>5} {'tasks':>6} {'ws':>4} {'lag ms':>7} {'driver lag':>10}"
)


def row(s: Sample, interval: float) -> str:
    t = s.tally
    fours = sum(v for k, v in t.statuses.items() if k.startswith("4"))
    return (
        f"{s.at:6.0f} {t.requests() / interval:6.0f} {t.statuses['2xx'] + t.statuses['101']:6d} {fours:6d} "
        f"{t.statuses['5xx']:4d} {sum(t.errors.values()):4d} {t.ws_messages / interval:8.0f} "
        f"{s.in_flight:9d} {s.rss_kib / 1024:8.1f} {s.fds:5d} {s.tasks:6d} {s.websockets:4d} {s.lag_ms:7.1f} "
        f"{t.driver_lag * 1000:10.0f}"
    )


def verdicts(samples: list[Sample], warmup: float) -> Iterator[str]:
    """Flat after warm-up: the second half of the samples against the first half."""
    steady = [s for s in samples if s.at > warmup]
    if len(steady) < 4:
        yield f"too few samples after the {warmup:g}s warm-up to judge"
        return
    half = len(steady) // 2
    early, late = steady[:half], steady[half:]

    def judge(name: str, values: list[float], unit: str, slack: float) -> str:
        first, second = statistics.mean(values[:half]), statistics.mean(values[half:])
        growth = second - first
        flat = growth <= slack
        return (
            f"{name:>6}: {statistics.mean(values[:half]):9.1f} -> {statistics.mean(values[half:]):9.1f} {unit} "
            f"(first half -> second half after warm-up; min {min(values):.1f}, max {max(values):.1f}): "
            f"{'flat' if flat else 'GROWING'}"
        )

    rss = [s.rss_kib / 1024 for s in steady]
    yield judge("RSS", rss, "MiB", max(2.0, 0.03 * statistics.mean(rss[:half])))
    slope = statistics.linear_regression([s.at for s in steady], rss).slope * 600
    yield f"{'':>6}  RSS trend after warm-up (least squares): {slope:+.2f} MiB per 10 minutes"
    fds = [float(s.fds) for s in steady]
    yield judge("fds", fds, "   ", max(10.0, 0.2 * max(s.fds for s in early)))
    tasks = [float(s.tasks) for s in steady]
    yield judge("tasks", tasks, "   ", max(10.0, 0.2 * max(s.tasks for s in early)))
    lag = [s.lag_ms for s in steady]
    yield judge("lag", lag, "ms ", max(20.0, statistics.mean(lag[:half])))
    del late


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    processes = Processes()
    try:
        setup = start_everything(processes, workdir)
        print(f"soak: gateway pid {setup.gateway_pid} on :{setup.port}, {args.duration:g}s of traffic at "
              f"{args.rate:g} req/s, {args.ws_clients} WebSockets, {args.ws_churn:g} short ones/s; "
              f"logs in {workdir}", flush=True)  # fmt: skip
        async with aiohttp.ClientSession() as admin:
            before = await sample(admin, setup, 0.0, Tally())
            print(f"before traffic: RSS {before.rss_kib / 1024:.1f} MiB, {before.fds} fds, {before.tasks} tasks")
            print(HEADER, flush=True)
            traffic = Traffic(setup, args.rate, args.ws_clients, args.ws_churn)
            running = asyncio.create_task(traffic.run())
            started = time.monotonic()
            samples: list[Sample] = []
            for tick in itertools.count(1):
                due = started + tick * args.interval
                if due > started + args.duration:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                tally, traffic.now = traffic.now, Tally()
                samples.append(await sample(admin, setup, time.monotonic() - started, tally, traffic.in_flight))
                print(row(samples[-1], args.interval), flush=True)
                if running.done():
                    break
            traffic.stopping.set()
            await asyncio.wait_for(running, timeout=60)
            await asyncio.sleep(args.settle)  # slow clients cut, sockets closed, tasks finished
            after = await sample(admin, setup, time.monotonic() - started, Tally())
        total = traffic.total
        print()
        print(f"traffic: {total.requests()} requests and WebSocket sessions, {dict(sorted(total.statuses.items()))}, "
              f"client errors {dict(total.errors)}, skipped {total.skipped}, "
              f"{total.ws_messages} WebSocket messages received")  # fmt: skip
        print(f"after warm-up ({args.warmup:g}s), under load:")
        for line in verdicts(samples, args.warmup):
            print("  " + line)
        sockets = dict(socket_peers(setup.gateway_pid, setup.peers))
        print(f"{args.settle:g}s after the traffic stopped: RSS {after.rss_kib / 1024:.1f} MiB, {after.fds} fds "
              f"(TCP sockets by peer: {sockets}) "
              f"(before: {before.fds}), {after.tasks} tasks (before: {before.tasks}), "
              f"{after.websockets} WebSockets")  # fmt: skip
        if args.json:
            write_json(Path(args.json), before, samples, after, total)
        return 0
    finally:
        processes.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def write_json(path: Path, before: Sample, samples: list[Sample], after: Sample, total: Tally) -> None:
    every = {"before": _plain(before), "samples": [_plain(s) for s in samples], "after": _plain(after),
             "statuses": dict(total.statuses), "errors": dict(total.errors)}  # fmt: skip
    path.write_text(json.dumps(every, indent=1))


def _plain(s: Sample) -> dict[str, object]:
    return {"at": round(s.at, 1), "rss_kib": s.rss_kib, "fds": s.fds, "tasks": s.tasks, "lag_ms": round(s.lag_ms, 1),
            "websockets": s.websockets, "statuses": dict(s.tally.statuses), "errors": dict(s.tally.errors)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default %(default)s)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default %(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds before judging flatness (default %(default)s)"
    )
    parser.add_argument("--rate", type=float, default=150.0, help="HTTP requests a second (default %(default)s)")
    parser.add_argument("--ws-clients", type=int, default=30, help="long-lived WebSockets (default %(default)s)")
    parser.add_argument("--ws-churn", type=float, default=2.0, help="short WebSockets a second (default %(default)s)")
    parser.add_argument(
        "--settle",
        type=float,
        default=65.0,
        help="seconds to wait after the traffic: idle upstream connections go after 30-60 s (default %(default)s)",
    )
    parser.add_argument("--json", help="also write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, routes.yaml)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(soak(args))
    return uvloop.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
