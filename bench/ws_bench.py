"""WebSocket relay rate and round trips (issue 6.5), and memory per idle connection.

``ws-relay``: an echo backend (``ws_echo.py``, frame level, pinned to the load CPU) reached
directly, through nginx's WebSocket proxy, through the minimal aiohttp relay
(``minimal_ws_relay.py``, the issue 8 reference) and through the gateway (all three on the
server CPU). ``ws_client.py rtt`` (one process, frame level, pinned to the load CPU) runs ``CLIENTS``
sockets, each sending a 64-byte text message and waiting for its echo; targets alternate
per round as in the HTTP benchmark.

``idle-memory``: a fresh gateway (and a fresh nginx, for reference) holds ``WS_IDLE``
idle proxied WebSockets, and a fresh gateway ``HTTP_IDLE`` idle keep-alive HTTP
connections; the RSS of the proxy's process tree before and after, divided by the count.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cpu import descendants
from servers import (
    BENCH_DIR,
    LOAD_CPU,
    SERVER_CPU,
    BenchError,
    CpuMeter,
    Server,
    free_port,
    start,
    start_gateway_with,
    start_nginx,
    wait_ready,
)

CLIENTS = 64  # concurrent sockets in the relay run, as wrk's 64 connections
MESSAGE_BYTES = 64
WS_IDLE = 5000
HTTP_IDLE = 1000
WS_TARGETS = ("ws-direct", "ws-nginx", "ws-minimal", "ws-gateway")
SETTLE = 2.0  # seconds after the holder reports its connections open, before reading RSS


def raise_nofile() -> None:
    """Every process started later inherits the limit: 5,000 proxied sockets need ~10,000 descriptors."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * WS_IDLE + 1000:
        raise BenchError(f"the open-files hard limit is {hard}; the idle-memory run needs {2 * WS_IDLE + 1000}")


def gateway_ws_routes(port: int, echo: int) -> str:
    # messages_per_second is per socket from the client; the default (100) would close a benchmark
    # socket with 1008 within a second. Pings and idle timeouts are pushed past the run.
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
admin: off
defaults: {{auth: none, rate_limit: off, cache: off}}
services:
  echo:
    upstreams: ["http://127.0.0.1:{echo}"]
    websocket: {{messages_per_second: 1000000, idle_timeout: 1h, ping_interval: 1h}}
"""


def nginx_ws_block(port: int, echo: int) -> str:
    return f"""        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{echo};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
        }}"""


@dataclass(frozen=True)
class WsTarget:
    name: str
    url: str  # ws://...
    server: Server  # the process charged: the echo backend for ws-direct, else the proxy


@dataclass(frozen=True)
class WsSample:
    rate: float  # round trips per second (each is two messages relayed)
    p50_ms: float
    p99_ms: float
    cpu_us: float  # CPU of ``server`` per round trip
    other_load_pct: float
    other_server_pct: float
    load_busy_pct: float  # how busy the load core was (the client and the echo backend, ours or not)


def _http(url: str) -> str:
    return "http" + url[2:]


def start_echo(work: Path, stack: contextlib.ExitStack) -> tuple[int, Server]:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "ws_echo.py"), "--port", str(port)]
    server = start("ws-echo", argv, LOAD_CPU, work, stack)
    wait_ready(server, f"http://127.0.0.1:{port}/ready", b"ok")
    return port, server


def start_ws_nginx(name: str, echo: int, work: Path, stack: contextlib.ExitStack) -> WsTarget:
    port = free_port()
    server = start_nginx(name, nginx_ws_block(port, echo), SERVER_CPU, work, stack, connections=2 * WS_IDLE + 1000)
    wait_ready(server, f"http://127.0.0.1:{port}/ready", b"ok")
    return WsTarget("ws-nginx", f"ws://127.0.0.1:{port}/ws", server)


def start_ws_minimal(name: str, echo: int, work: Path, stack: contextlib.ExitStack) -> WsTarget:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "minimal_ws_relay.py"), "--upstream", f"http://127.0.0.1:{echo}",
            "--port", str(port)]  # fmt: skip
    server = start(name, argv, SERVER_CPU, work, stack)
    wait_ready(server, f"http://127.0.0.1:{port}/ready", b"ok")
    return WsTarget("ws-minimal", f"ws://127.0.0.1:{port}/ws", server)


def start_ws_gateway(name: str, echo: int, work: Path, stack: contextlib.ExitStack) -> WsTarget:
    port = free_port()
    server = start_gateway_with(name, gateway_ws_routes(port, echo), port, work, stack)
    wait_ready(server, f"http://127.0.0.1:{port}/api/echo/ready", b"ok")
    return WsTarget("ws-gateway", f"ws://127.0.0.1:{port}/api/echo/ws", server)


def _wait_line(client: Server, predicate: str, timeout: float) -> str:
    """The first line of the client's output starting with ``predicate``; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in client.log_path.read_text(errors="replace").splitlines():
            if line.startswith(predicate):
                return line
        if client.proc.poll() is not None:
            raise BenchError(f"{client.name} exited with {client.proc.returncode}; output:\n{client.log_tail()}")
        time.sleep(0.02)
    raise BenchError(f"{client.name}: no {predicate!r} line after {timeout:.0f}s; output:\n{client.log_tail()}")


def measure_relay(target: WsTarget, servers: list[Server], warmup: int, seconds: int, label: str,
                  work: Path, stack: contextlib.ExitStack) -> WsSample:  # fmt: skip
    argv = [sys.executable, str(BENCH_DIR / "ws_client.py"), "rtt", "--url", target.url,
            "--clients", str(CLIENTS), "--size", str(MESSAGE_BYTES),
            "--warmup", str(warmup), "--seconds", str(seconds)]  # fmt: skip
    client = start(f"ws-client-{label}", argv, LOAD_CPU, work, stack)
    _wait_line(client, "measuring", warmup + 30)
    meter = CpuMeter([*servers, client])
    result = json.loads(_wait_line(client, "{", seconds + 30))
    cpu, foreign = meter.read()
    client.stop()
    return WsSample(
        rate=result["rate"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        cpu_us=cpu[target.server.name] * 1e6 / max(1, result["round_trips"]),
        other_load_pct=foreign[LOAD_CPU] * 100,
        other_server_pct=foreign[SERVER_CPU] * 100,
        load_busy_pct=meter.busy[LOAD_CPU] * 100,
    )


def run_relay(rounds: int, warmup: int, seconds: int, work: Path, stack: contextlib.ExitStack,
              echo: tuple[int, Server]) -> dict[str, list[WsSample]]:  # fmt: skip
    echo_port, echo_server = echo
    targets = [
        WsTarget("ws-direct", f"ws://127.0.0.1:{echo_port}/ws", echo_server),
        start_ws_nginx("ws-nginx", echo_port, work, stack),
        start_ws_minimal("ws-minimal", echo_port, work, stack),
        start_ws_gateway("ws-gateway", echo_port, work, stack),
    ]
    servers = [echo_server, *(t.server for t in targets[1:])]
    samples: dict[str, list[WsSample]] = {t.name: [] for t in targets}
    for round_no in range(1, rounds + 1):
        for target in targets:
            sample = measure_relay(target, servers, warmup, seconds, f"{target.name}-{round_no}", work, stack)
            samples[target.name].append(sample)
            print(
                f"round {round_no}/{rounds} {target.name:<14} {sample.rate:>9,.0f} round trips/s"
                f"  p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms  {sample.cpu_us:6.1f} µs/rt"
                f"  other {sample.other_load_pct:.0f}%/{sample.other_server_pct:.0f}%"
                f"  load core {sample.load_busy_pct:.0f}% busy",
                flush=True,
            )
    return samples


# --- memory per idle connection ------------------------------------------------------------


def rss_kib(server: Server) -> int:
    """Resident memory of the server's process tree (nginx: master and worker), KiB."""
    total = 0
    for pid in (server.proc.pid, *descendants(server.proc.pid)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@dataclass(frozen=True)
class IdleSample:
    what: str
    count: int
    before_kib: int
    after_kib: int

    @property
    def per_connection_kib(self) -> float:
        return (self.after_kib - self.before_kib) / self.count


def hold(server: Server, mode: str, url: str, count: int, label: str, work: Path,
         stack: contextlib.ExitStack) -> IdleSample:  # fmt: skip
    """Warm the proxy with a few connections, then read its RSS around ``count`` idle ones."""
    script = str(BENCH_DIR / "ws_client.py")
    warm = start(f"hold-{label}-warm", [sys.executable, script, mode, "--url", url, "--count", "50"],
                 LOAD_CPU, work, stack)  # fmt: skip
    _wait_line(warm, "open", 60)
    warm.stop()
    time.sleep(SETTLE)
    before = rss_kib(server)
    holder = start(f"hold-{label}", [sys.executable, script, mode, "--url", url, "--count", str(count)],
                   LOAD_CPU, work, stack)  # fmt: skip
    _wait_line(holder, "open", 120)
    time.sleep(SETTLE)
    after = rss_kib(server)
    if server.proc.poll() is not None:
        raise BenchError(f"{server.name} exited while holding {count} connections; log:\n{server.log_tail()}")
    holder.stop()
    return IdleSample(label, count, before, after)


def run_idle(work: Path, stack: contextlib.ExitStack, echo: tuple[int, Server]) -> list[IdleSample]:
    echo_port, _ = echo
    gateway = start_ws_gateway("idle-gateway-ws", echo_port, work, stack)
    nginx = start_ws_nginx("idle-nginx-ws", echo_port, work, stack)
    http_gateway = start_ws_gateway("idle-gateway-http", echo_port, work, stack)
    http_url = _http(http_gateway.url)
    samples = [
        hold(gateway.server, "hold-ws", gateway.url, WS_IDLE, "gateway, idle WebSocket", work, stack),
        hold(nginx.server, "hold-ws", nginx.url, WS_IDLE, "nginx, idle WebSocket", work, stack),
        hold(http_gateway.server, "hold-http", http_url, HTTP_IDLE, "gateway, idle keep-alive HTTP", work, stack),
    ]
    for sample in samples:
        print(f"{sample.what}: {sample.count} connections, {sample.per_connection_kib:.1f} KiB each", flush=True)
    return samples


# --- report --------------------------------------------------------------------------------


def relay_medians(samples: dict[str, list[WsSample]]) -> dict[str, WsSample]:
    return {
        name: WsSample(*(float(statistics.median(getattr(s, f) for s in runs)) for f in WsSample.__dataclass_fields__))
        for name, runs in samples.items()
    }


def relay_table(samples: dict[str, list[WsSample]]) -> str:
    lines = [
        "| target | round trips/s | messages relayed/s | p50 ms | p99 ms | CPU µs per round trip"
        " | round trips/s per round | other load % CPU 0 / 1 | load core busy % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    medians = relay_medians(samples)
    for name, runs in samples.items():
        m = medians[name]
        lines.append(
            f"| {name} | {m.rate:,.0f} | {2 * m.rate:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.cpu_us:.1f}"
            f" | {' / '.join(f'{s.rate:,.0f}' for s in runs)} | {m.other_load_pct:.0f} / {m.other_server_pct:.0f}"
            f" | {m.load_busy_pct:.0f} |"
        )
    load = [s.other_load_pct for runs in samples.values() for s in runs]
    server = [s.other_server_pct for runs in samples.values() for s in runs]
    if load:
        lines += [
            "",
            f"Noise: work not ours took {min(load):.0f} to {max(load):.0f}% of CPU 0 and {min(server):.0f} to"
            f" {max(server):.0f}% of CPU 1 during the measured runs (for `ws-direct`, CPU 1 is idle and anything"
            " fills it).",
        ]
    saturated = [name for name in ("ws-minimal", "ws-gateway") if name in medians and medians[name].load_busy_pct >= 95]
    if saturated:
        busy = " and ".join(f"{medians[name].load_busy_pct:.0f}% during `{name}`" for name in saturated)
        lines += [
            "",
            f"The load core (the client and the echo backend) was busy {busy}: the round trips a second are"
            " bounded by the load side as much as by the relay, and a relay that leaves its own core idle more"
            " often can even make fewer of them (its wake-ups cost the load core). The CPU per round trip is the"
            " relay's own figure (bench/README.md, twelfth session).",
        ]
    for reference, minimum, issue in (("ws-nginx", 0.5, "6.5"), ("ws-minimal", 1.0, "8")):
        if "ws-gateway" in medians and reference in medians:
            ours, ref = medians["ws-gateway"], medians[reference]
            verdict = "met" if ours.rate >= minimum * ref.rate else "missed"
            lines += [
                "",
                f"ws-gateway / {reference}: round trips/s {ours.rate / ref.rate:.2f}x (issue {issue} target"
                f" ≥ {minimum:.2f}x: {verdict}), p99 {ours.p99_ms / ref.p99_ms:.2f}x, CPU per round trip"
                f" {ours.cpu_us / ref.cpu_us:.2f}x",
            ]
    return "\n".join(lines)


def idle_table(samples: list[IdleSample]) -> str:
    lines = [
        "| proxy, connection kind | connections | RSS before MiB | RSS after MiB | KiB per connection |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        lines.append(
            f"| {s.what} | {s.count:,} | {s.before_kib / 1024:.1f} | {s.after_kib / 1024:.1f}"
            f" | {s.per_connection_kib:.1f} |"
        )
    for what, kind, limit in (("gateway, idle WebSocket", "idle proxied WebSocket", 40),
                              ("gateway, idle keep-alive HTTP", "idle keep-alive client connection", 10)):  # fmt: skip
        found = next((s for s in samples if s.what == what), None)
        if found is not None:
            verdict = "met" if found.per_connection_kib <= limit else "missed"
            lines += ["", f"Gateway memory per {kind}: {found.per_connection_kib:.2f} KiB (target ≤ {limit} KiB:"
                      f" {verdict})"]  # fmt: skip
    return "\n".join(lines)
