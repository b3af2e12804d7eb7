"""The processes a benchmark run starts, each pinned with taskset and stopped by pid.

An nginx static backend, and the servers under test in front of it: an nginx
``proxy_pass`` with a keep-alive upstream pool, ``bench/minimal_proxy.py`` and the
gateway. Everything lives in a private work dir (configs, pid files, logs, temp files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cpu import core_seconds, descendants, reaped_children_seconds, tree_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
LOAD_CPU = "0"  # wrk and the nginx backend
SERVER_CPU = "1"  # the server under test, alone
READY_TIMEOUT = 20.0  # seconds for a server to answer its first request
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

FILE_NAME = "hello.json"
DIRECT_PATH = f"/{FILE_NAME}"  # what the backend serves; nginx and minimal proxies pass paths through
GATEWAY_PATH = f"/api/static/{FILE_NAME}"  # DESIGN §4: the gateway maps it to <upstream>/hello.json


class BenchError(Exception):
    """Something the harness cannot measure around; the message says what and where."""


def payload() -> bytes:
    """A 100-byte JSON document: small enough that per-request overhead dominates."""
    head = b'{"message":"hello from the static backend","pad":"'
    return head + b"x" * (100 - len(head) - 3) + b'"}\n'


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
    cpu: str  # the core it is pinned to
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

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
                for pid in family:  # e.g. nginx workers left behind by a killed master
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.log.close()


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
    """CPU time over one measured run: each server's, and per core what went to anything not ours."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self._servers = servers
        self._started = time.monotonic()
        self._cores = core_seconds((LOAD_CPU, SERVER_CPU))
        self._children = reaped_children_seconds()
        self._before = {server.name: server.cpu_seconds() for server in servers}

    def read(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds per server, and per core the share of the run spent on other work (0.05 = 5%)."""
        used = {server.name: server.cpu_seconds() - self._before[server.name] for server in self._servers}
        ours = {LOAD_CPU: reaped_children_seconds() - self._children, SERVER_CPU: 0.0}  # wrk runs on LOAD_CPU
        for server in self._servers:
            ours[server.cpu] += used[server.name]
        wall = time.monotonic() - self._started
        busy = core_seconds(ours)
        return used, {cpu: max(0.0, busy[cpu] - self._cores[cpu] - ours[cpu]) / wall for cpu in ours}


# --- the servers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing wrk drives; ``server`` is the process whose CPU time is charged to it.

    ``headers`` (``Name: value``) go with every request; ``helpers`` are processes the
    target needs besides its server (a Redis), whose CPU time is ours, not other load.
    """

    name: str
    url: str
    server: Server
    headers: tuple[str, ...] = ()
    helpers: tuple[Server, ...] = ()


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
    block = f"""        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{ root {html}; }}"""
    server = start_nginx("backend", block, LOAD_CPU, work, stack)
    return Target("direct", f"http://127.0.0.1:{port}{DIRECT_PATH}", server)


def start_nginx_proxy(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    upstream = f"upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}"
    block = f"""        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    server = start_nginx("nginx-proxy", block, SERVER_CPU, work, stack, upstream)
    return Target("nginx-proxy", f"http://127.0.0.1:{port}{DIRECT_PATH}", server)


def start_minimal_proxy(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    script = str(BENCH_DIR / "minimal_proxy.py")
    argv = [sys.executable, script, "--upstream", f"http://127.0.0.1:{backend}", "--port", str(port)]
    server = start("minimal-proxy", argv, SERVER_CPU, work, stack)
    return Target("minimal-proxy", f"http://127.0.0.1:{port}{DIRECT_PATH}", server)


def gateway_command() -> str:
    beside = Path(sys.executable).parent / "gateway"  # the venv this script runs in
    found = str(beside) if beside.exists() else shutil.which("gateway")
    if not found:
        raise BenchError("no `gateway` command next to this python or on PATH; `pip install -e .` into this venv")
    return found


def start_gateway_with(name: str, routes: str, port: int, work: Path, stack: contextlib.ExitStack) -> Server:
    """``gateway run`` on ``routes`` (a routes.yaml text), written to ``<work>/<name>/routes.yaml``."""
    config = work / name / "routes.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(routes)
    argv = [gateway_command(), "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return start(name, argv, SERVER_CPU, work, stack)


def plain_routes(port: int, backend: int, *, defaults: str = "auth: none, rate_limit: off, cache: off") -> str:
    """The plain-proxy routes.yaml; the feature targets change ``defaults`` and add sections."""
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
admin: off
defaults: {{{defaults}}}
services:
  static: {{upstreams: ["http://127.0.0.1:{backend}"]}}
"""


def start_gateway(port: int, backend: int, work: Path, stack: contextlib.ExitStack) -> Target:
    """The gateway as a plain proxy: no auth, no rate limit, no cache, no admin listener."""
    server = start_gateway_with("gateway", plain_routes(port, backend), port, work, stack)
    return Target("gateway", f"http://127.0.0.1:{port}{GATEWAY_PATH}", server)


StartFn = Callable[[int, int, Path, contextlib.ExitStack], Target]
STARTERS: dict[str, StartFn] = {
    "nginx-proxy": start_nginx_proxy,
    "minimal-proxy": start_minimal_proxy,
    "gateway": start_gateway,
}


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
    """The backend (always) and the named targets, in ``starters`` order, each answering correctly."""
    backend_port = free_port()
    direct = start_backend(backend_port, work, stack)
    wait_ready(direct.server, direct.url, payload())
    targets = [direct] if "direct" in names else []
    for name in (n for n in starters if n in names):
        target = starters[name](free_port(), backend_port, work, stack)
        wait_ready(target.server, target.url, payload(), target.headers)
        targets.append(target)
    return Lab(direct.server, targets)
