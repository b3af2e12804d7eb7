"""Drive a URL with wrk and read its report (requests/s and the --latency distribution)."""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from servers import BENCH_DIR, LOAD_CPU, BenchError

UNIQUE_QUERY = BENCH_DIR / "unique_query.lua"  # a new query string on every request (cache misses)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses plus socket errors


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _search(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise BenchError(f"unexpected wrk output (no {pattern!r}):\n{text}")
    return match


def _percentile_ms(percent: int, text: str) -> float:
    value, unit = _search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text).groups()
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Read requests, requests/s and the --latency distribution's 50%/99% from wrk's report."""
    requests = int(_search(r"^\s*(\d+) requests in ", text).group(1))
    if requests == 0:
        raise BenchError(f"wrk got no responses:\n{text}")
    errors = 0
    if socket_errors := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        errors += sum(int(n) for n in socket_errors.groups())
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors += int(non_2xx.group(1))
    rps = float(_search(r"^Requests/sec:\s+([\d.]+)", text).group(1))
    return WrkResult(requests, rps, _percentile_ms(50, text), _percentile_ms(99, text), errors)


def wrk(
    url: str, connections: int, seconds: int, headers: Sequence[str] = (), *, unique_query: bool = False
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<seconds>s --latency [-H header]...`` pinned to the load CPU;
    ``unique_query`` runs ``unique_query.lua`` with a fresh run id (every request a new URL)."""
    extra = [arg for header in headers for arg in ("-H", header)]
    if unique_query:
        extra += ["-s", str(UNIQUE_QUERY)]
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", *extra, url]
    if unique_query:
        argv += ["--", secrets.token_hex(6)]
    done = subprocess.run(
        ["taskset", "-c", LOAD_CPU, *argv], capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}) on {url}: {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)
