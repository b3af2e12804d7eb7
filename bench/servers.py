"""The processes a benchmark run starts, each pinned with taskset and stopped by pid.

An nginx static backend (a 100-byte JSON file and a 1 MiB file), and the servers under
test in front of it: an nginx ``proxy_pass`` with a keep-alive upstream pool,
``bench/minimal_proxy.py`` and the gateway (on its default event loop or forced onto
asyncio, with one or two workers). Everything lives in a private work dir (configs, pid
files, logs, temp files).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from cpu import core_seconds, descendants, process_children, reaped_children_seconds, tree_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
LOAD_CPU = "0"  # wrk and the nginx backend
SERVER_CPU = "1"  # the server under test, alone
READY_TIMEOUT = 20.0  # seconds for a server to answer its first request
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

FILE_NAME = "hello.json"
DIRECT_PATH = f"/{FILE_NAME}"  # what the backend serves; nginx and minimal proxies pass paths through
GATEWAY_PATH = f"/api/static/{FILE_NAME}"  # DESIGN §4: the gateway maps it to <upstream>/hello.json
BIG_NAME = "1mib.bin"  # the 1 MiB body of the ``-1mib`` targets
BIG_DIRECT_PATH = f"/{BIG_NAME}"
BIG_GATEWAY_PATH = f"/api/static/{BIG_NAME}"
BOTH_CPUS = f"{LOAD_CPU},{SERVER_CPU}"  # ``gateway-workers-2``: the workers float over both cores


class BenchError(Exception):
    """Something the harness cannot measure around; the message says what and where."""


def payload() -> bytes:
    """A 100-byte JSON document: small enough that per-request overhead dominates."""
    head = b'{"message":"hello from the static backend","pad":"'
    return head + b"x" * (100 - len(head) - 3) + b'"}\n'


def big_payload() -> bytes:
    """1 MiB (1,048,576 bytes) for the large-body targets: bytes, not per-request overhead."""
    return bytes(range(256)) * 4096


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A process this harness started (pinned with taskset), its log, and how to stop it."""

    name: str
    cpu: str  # the core(s) it is pinned to: "1", or "0,1"
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def cpu_seconds(self, parents: dict[int, list[int]] | None = None) -> float:
        return tree_cpu_seconds(self.proc.pid, parents)

    def loop_used(self) -> str:
        """The event loop an aiohttp server says it runs on in its startup log ("uvloop",
        "asyncio"), or "" when it does not say (nginx)."""
        found = _LOOP_IN_LOG.search(self.log_head())
        return next((group for group in found.groups() if group), "") if found else ""

    def log_head(self, size: int = 8192) -> str:
        with self.log_path.open("rb") as log:
            return log.read(size).decode(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        with self.log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            text = log.read().decode(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            family = descendants(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            # whatever the parent left behind: nginx workers of a killed master, the processes
            # `minimal_proxy.py --processes` forked (their parent does not stop them)
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.log.close()


# gateway: "listening on http://h:p (pid 123, uvloop)"; bench servers: "(loop: asyncio)"
_LOOP_IN_LOG = re.compile(r"\(pid \d+, (\w+)\)|\(loop: (\w+)")


def start(name: str, argv: list[str], cpu: str, work: Path, stack: contextlib.ExitStack) -> Server:
    log_path = work / f"{name}.log"
    log = log_path.open("wb")
    # A new session keeps Ctrl-C away from the servers: they are stopped by pid, in order.
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(name, cpu, proc, log_path, log)
    stack.callback(server.stop)
    return server


def wait_ready(
    server: Server, url: str, expect: bytes, headers: Sequence[str] = (), must_have: Sequence[str] = ()
) -> None:
    """Poll ``url`` until it returns 200 with ``expect`` (and the response headers named in
    ``must_have``); ``headers`` are ``Name: value`` lines sent along. Fails early if the server exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sent = dict(line.split(": ", 1) for line in headers)
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.proc.returncode}; log:\n{server.log_tail()}")
        try:
            with opener.open(urllib.request.Request(url, headers=sent), timeout=2) as response:
                body = response.read()
                missing = [name for name in must_have if name not in response.headers]
            if body == expect and not missing:
                return
            if missing:
                body = f"no {', '.join(missing)} header".encode()
            last = f"200 with an unexpected body {body[:200]!r}"
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise BenchError(f"{server.name} not ready at {url} after {READY_TIMEOUT:.0f}s: {last}; log:\n{server.log_tail()}")


class CpuMeter:
    """CPU time over one measured run: each server's, and per core what went to anything not ours.

    A server pinned to both cores (``gateway-workers-2``) cannot be split between them, so
    while one runs the two cores' foreign shares are computed together (the same figure
    for both)."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self._servers = servers
        self._started = time.monotonic()
        self._cores = core_seconds((LOAD_CPU, SERVER_CPU))
        self._children = reaped_children_seconds()
        parents = process_children()
        self._before = {server.name: server.cpu_seconds(parents) for server in servers}
        self.busy: dict[str, float] = {}  # per core, set by read()

    def read(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds per server, and per core the share of the run spent on other work (0.05 = 5%).
        Afterwards ``busy`` holds each core's busy share of the run, ours and others' work alike."""
        parents = process_children()
        used = {server.name: server.cpu_seconds(parents) - self._before[server.name] for server in self._servers}
        ours = {LOAD_CPU: reaped_children_seconds() - self._children, SERVER_CPU: 0.0}  # wrk runs on LOAD_CPU
        spread = 0.0  # servers pinned to both cores
        for server in self._servers:
            if server.cpu in ours:
                ours[server.cpu] += used[server.name]
            else:
                spread += used[server.name]
        wall = time.monotonic() - self._started
        busy = core_seconds(ours)
        self.busy = {cpu: (busy[cpu] - self._cores[cpu]) / wall for cpu in ours}
        foreign = {cpu: max(0.0, busy[cpu] - self._cores[cpu] - ours[cpu]) / wall for cpu in ours}
        if spread > 0.01 * wall:  # a server on both cores did real work in this window
            both = sum(busy[cpu] - self._cores[cpu] - ours[cpu] for cpu in ours) - spread
            foreign = dict.fromkeys(ours, max(0.0, both) / (wall * len(ours)))
        return used, foreign


# --- the servers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing wrk drives; ``server`` is the process whose CPU time is charged to it.

    ``headers`` (``Name: value``) go with every request; ``helpers`` are processes the
    target needs besides its server (a Redis), whose CPU time is ours, not other load.
    ``body`` is what every response must carry (checked before measuring; its size gives
    MB/s). ``unique_query``: wrk appends a query string never sent before to every request
    (``unique_query.lua``), so a cache never has the answer. ``single``: also measured at
    1 connection. ``loop``: the event loop the server must say it runs on ("" = its default).
    """

    name: str
    url: str
    server: Server
    headers: tuple[str, ...] = ()
    helpers: tuple[Server, ...] = ()
    body: bytes = field(default_factory=payload, repr=False)
    unique_query: bool = False
    single: bool = False
    loop: str = ""


def nginx_conf(prefix: Path, server_block: str, upstream_block: str = "", connections: int = 4096) -> Path:
    """A self-contained nginx.conf: pid, logs and temp files under ``prefix``, one worker."""
    user = "user root;" if os.geteuid() == 0 else ""  # the default, nobody:nobody, lacks a group on Debian
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}
daemon off;
worker_processes 1;
worker_rlimit_nofile {connections + 100};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;  # the default 1000 would reconnect wrk's connections mid-run
    {upstream_block}
    server {{
{server_block}
    }}
}}
""")
    return conf


def start_nginx(
    name: str,
    server_block: str,
    cpu: str,
    work: Path,
    stack: contextlib.ExitStack,
    upstream: str = "",
    connections: int = 4096,
) -> Server:
    prefix = work / name
    prefix.mkdir()
    conf = nginx_conf(prefix, server_block, upstream, connections)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return start(name, [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)], cpu, work, stack)


def start_backend(port: int, work: Path, stack: contextlib.ExitStack) -> Target:
    html = work / "html"
    html.mkdir()
    (html / FILE_NAME).write_bytes(payload())
    (html / BIG_NAME).write_bytes(big_payload())
    # sendfile for the large file only: the small-body rows stay comparable with earlier runs
    block = f"""        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{ root {html}; }}
        location = /{BIG_NAME} {{ root {html}; sendfile on; default_type application/octet-stream; }}"""
    server = start_nginx("backend", block, LOAD_CPU, work, stack)
    return Target("direct", f"http://127.0.0.1:{port}{DIRECT_PATH}", server, single=True)


def big(target: Target) -> Target:
    """The same server, fetching the 1 MiB file instead (named ``<name>-1mib``)."""
    url = target.url.removesuffix(FILE_NAME) + BIG_NAME
    name = target.name if target.name.endswith("-1mib") else f"{target.name}-1mib"
    return replace(target, name=name, url=url, body=big_payload(), single=False)


def start_nginx_proxy(port: int, backend: int, work: Path, stack: contextlib.ExitStack,
                      name: str = "nginx-proxy", tuning: str = "") -> Target:  # fmt: skip
    upstream = f"upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}"
    block = f"""        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{tuning}
        }}"""
    server = start_nginx(name, block, SERVER_CPU, work, stack, upstream)
    return Target(name, f"http://127.0.0.1:{port}{DIRECT_PATH}", server, single=name == "nginx-proxy")


def start_minimal_proxy(port: int, backend: int, work: Path, stack: contextlib.ExitStack, name: str = "minimal-proxy",
                        loop: str = "", processes: int = 1) -> Target:  # fmt: skip
    """``minimal_proxy.py`` on its default loop (uvloop when installed, as the gateway), or ``loop``;
    ``processes`` > 1 forks that many sharing the port, all on the server core."""
    script = str(BENCH_DIR / "minimal_proxy.py")
    argv = [sys.executable, script, "--upstream", f"http://127.0.0.1:{backend}", "--port", str(port)]
    if loop:
        argv += ["--loop", loop]
    if processes != 1:
        argv += ["--processes", str(processes)]
    server = start(name, argv, SERVER_CPU, work, stack)
    return Target(name, f"http://127.0.0.1:{port}{DIRECT_PATH}", server, single=name == "minimal-proxy", loop=loop)


def start_minimal_proxy_asyncio(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return start_minimal_proxy(port, backend, work, stack, "minimal-proxy-asyncio", loop="asyncio")


def gateway_command(loop: str = "") -> list[str]:
    """``gateway`` from the venv this script runs in; with ``loop="asyncio"``, the same command
    through ``gateway_on_asyncio.py``, which keeps the gateway off uvloop (DESIGN §2 has no switch)."""
    if loop == "asyncio":
        return [sys.executable, str(BENCH_DIR / "gateway_on_asyncio.py")]
    if loop:
        raise BenchError(f"no way to force the gateway onto {loop!r}")
    beside = Path(sys.executable).parent / "gateway"
    found = str(beside) if beside.exists() else shutil.which("gateway")
    if not found:
        raise BenchError("no `gateway` command next to this python or on PATH; `pip install -e .` into this venv")
    return [found]


def start_gateway_with(name: str, routes: str, port: int, work: Path, stack: contextlib.ExitStack, *,
                       loop: str = "", workers: int = 1, cpu: str = SERVER_CPU) -> Server:  # fmt: skip
    """``gateway run`` on ``routes`` (a routes.yaml text), written to ``<work>/<name>/routes.yaml``;
    ``loop="asyncio"`` forces asyncio, ``workers`` > 1 adds ``--workers``, ``cpu`` is the taskset list."""
    config = work / name / "routes.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(routes)
    argv = [*gateway_command(loop), "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    return start(name, argv, cpu, work, stack)


def plain_routes(port: int, backend: int, *, defaults: str = "auth: none, rate_limit: off, cache: off") -> str:
    """The plain-proxy routes.yaml; the feature targets change ``defaults`` and add sections."""
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
admin: off
defaults: {{{defaults}}}
services:
  static: {{upstreams: ["http://127.0.0.1:{backend}"]}}
"""


def start_gateway(port: int, backend: int, work: Path, stack: contextlib.ExitStack, name: str = "gateway", *,
                  loop: str = "", workers: int = 1, cpu: str = SERVER_CPU) -> Target:  # fmt: skip
    """The gateway as a plain proxy: no auth, no rate limit, no cache, no admin listener."""
    server = start_gateway_with(name, plain_routes(port, backend), port, work, stack, loop=loop, workers=workers,
                                cpu=cpu)  # fmt: skip
    return Target(name, f"http://127.0.0.1:{port}{GATEWAY_PATH}", server, single=name == "gateway", loop=loop)


def start_gateway_asyncio(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return start_gateway(port, backend, work, stack, "gateway-asyncio", loop="asyncio")


def start_minimal_proxy_2_cpu1(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """The control for ``gateway-workers-2-cpu1``: the minimal proxy as two processes sharing the
    port, both on the server core: what two aiohttp processes sharing one core cost any app."""
    return start_minimal_proxy(port, backend, work, stack, "minimal-proxy-2-cpu1", processes=2)


def start_gateway_workers_2_cpu1(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """``--workers 2``, both pinned to the server core: the same CPU budget as ``gateway``, so
    the rows compare what a worker process costs per request, not extra cores."""
    return start_gateway(port, backend, work, stack, "gateway-workers-2-cpu1", workers=2)


def start_gateway_workers_2(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """``--workers 2`` on both cores, the second shared with wrk and the backend: what a second
    core can add on this 2-core machine (see the README on pinning)."""
    return start_gateway(port, backend, work, stack, "gateway-workers-2", workers=2, cpu=BOTH_CPUS)


def start_nginx_proxy_1mib(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    # 64 KiB proxy buffers instead of the default 4 KiB pages: nginx as one would set it up for large bodies
    tuning = "\n            proxy_buffer_size 64k; proxy_buffers 16 64k; proxy_busy_buffers_size 128k;"
    return big(start_nginx_proxy(port, backend, work, stack, "nginx-proxy-1mib", tuning))


def start_minimal_proxy_1mib(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return big(start_minimal_proxy(port, backend, work, stack, "minimal-proxy-1mib"))


def start_gateway_1mib(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    return big(start_gateway(port, backend, work, stack, "gateway-1mib"))


StartFn = Callable[[int, int, Path, contextlib.ExitStack], Target]
STARTERS: dict[str, StartFn] = {
    "nginx-proxy": start_nginx_proxy,
    "minimal-proxy": start_minimal_proxy,
    "minimal-proxy-asyncio": start_minimal_proxy_asyncio,
    "gateway": start_gateway,
    "gateway-asyncio": start_gateway_asyncio,
    "minimal-proxy-2-cpu1": start_minimal_proxy_2_cpu1,
    "gateway-workers-2-cpu1": start_gateway_workers_2_cpu1,
    "gateway-workers-2": start_gateway_workers_2,
}
ONE_MIB_STARTERS: dict[str, StartFn] = {  # after the feature targets in a round
    "nginx-proxy-1mib": start_nginx_proxy_1mib,
    "minimal-proxy-1mib": start_minimal_proxy_1mib,
    "gateway-1mib": start_gateway_1mib,
}
BACKEND_TARGETS = ("direct", "direct-1mib")  # nginx serving the files itself: the backend, no proxy


@dataclass(frozen=True)
class Lab:
    """Everything started for a run: the backend and the targets wrk drives."""

    backend: Server
    targets: list[Target]

    @property
    def servers(self) -> list[Server]:
        others = [s for t in self.targets for s in (t.server, *t.helpers) if s is not self.backend]
        return [self.backend, *others]


def start_lab(names: Sequence[str], starters: dict[str, StartFn], work: Path, stack: contextlib.ExitStack) -> Lab:
    """The backend (always) and the named targets, in ``names`` order, each answering correctly
    (and on the event loop it asked for)."""
    backend_port = free_port()
    direct = start_backend(backend_port, work, stack)
    wait_ready(direct.server, direct.url, payload())
    targets = []
    for name in names:
        if name in BACKEND_TARGETS:
            target = direct if name == "direct" else big(direct)
        else:
            target = starters[name](free_port(), backend_port, work, stack)
        wait_ready(target.server, target.url, target.body, target.headers)
        if target.loop and (used := target.server.loop_used()) != target.loop:
            raise BenchError(f"{name} runs on {used or 'an unnamed loop'}, not {target.loop}; log:\n"
                             f"{target.server.log_tail()}")  # fmt: skip
        targets.append(target)
    return Lab(direct.server, targets)
