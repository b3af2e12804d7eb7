"""The benchmark harness's arithmetic (bench/wrk.py, bench/report.py): no servers, no wrk run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from report import Sample, WsFigures, issue8_checks, loops_table, median, workers_table
from wrk import parse_wrk
from ws_bench import WsSample, relay_table

WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:8080/api/static/hello.json
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    52.15ms   20.01ms 131.33ms   70.00%
    Req/Sec     1.20k   100.00     1.40k    70.00%
  Latency Distribution
     50%   52.15ms
     75%   60.00ms
     90%   80.00ms
     99%  131.33ms
  9576 requests in 8.00s, 2.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   1197.00
Transfer/sec:    256.00KB
"""


def sample(rps: float, cpu_us: float, *, p99: float = 100.0, single: float | None = None,
           mb_s: float | None = None) -> Sample:  # fmt: skip
    return Sample(rps, 10.0, p99, cpu_us, single, single, 0.0, 0.0, 0, mb_s)


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    result = parse_wrk(WRK_OUTPUT)
    figures = (result.requests, result.rps, result.p50_ms, result.p99_ms, result.errors)
    assert figures == (9576, 1197.0, 52.15, 131.33, 6)


def test_median_keeps_missing_optional_figures_missing() -> None:
    runs = [sample(1.0, 1.0), sample(3.0, 3.0), sample(2.0, 2.0)]
    m = median(runs)
    assert (m.rps, m.single_p50_ms, m.mb_s) == (2.0, None, None)


def test_issue8_checks_compute_each_ratio_and_verdict() -> None:
    samples = {
        "direct": [sample(17000, 30, single=0.06)],
        "minimal-proxy": [sample(2000, 500, p99=80, single=0.60)],
        "gateway": [sample(2600, 380, p99=70, single=0.50)],  # 1.30x, p99 0.875x, +0.44 ms
        "gateway-full-chain": [sample(1500, 660)],  # 0.75x
        "gateway-cache-hit": [sample(6000, 160)],  # 3.00x
        "minimal-proxy-1mib": [sample(300, 3000, mb_s=314.6)],
        "gateway-1mib": [sample(320, 2800, mb_s=335.5)],  # 1.066x
    }
    ws = WsFigures(relay={"ws-gateway": (9000, 60), "ws-minimal": (6000, 90)},
                   idle_kib={"gateway, idle keep-alive HTTP": 10.02, "gateway, idle WebSocket": 37.0})  # fmt: skip
    verdicts = {check.goal: (check.value, check.passed) for check in issue8_checks(samples, ws)}
    assert verdicts == {
        "plain proxied GET": ("1.30x", True),
        "full chain (HS256 + Redis limit + cache miss)": ("0.75x", False),
        "cache hit": ("3.00x", True),
        "p99 at 64 connections": ("0.88x", True),
        "added p50 at 1 connection, over `direct`": ("0.44 ms", True),
        "1 MiB bodies": ("1.07x", False),
        "WebSocket relay round trips": ("1.50x", True),
        "memory per idle keep-alive HTTP connection": ("10.02 KiB", False),
        "memory per idle WebSocket connection": ("37.00 KiB", True),
    }


def test_throughput_checks_give_the_ratio_of_each_round_next_to_the_medians() -> None:
    samples = {
        "minimal-proxy": [sample(2000, 500), sample(2500, 400), sample(1600, 600)],
        "gateway": [sample(2600, 380), sample(2800, 350), sample(2400, 410)],  # medians 2600 / 2000
    }
    plain = issue8_checks(samples, None)[0]
    assert (plain.value, plain.rounds) == ("1.30x", "1.30x / 1.12x / 1.50x")
    assert "| 1.30x / 1.12x / 1.50x | met |" in plain.row()


def test_issue8_checks_say_what_was_not_measured() -> None:
    checks = issue8_checks({"gateway": [sample(1000, 800)]}, None)
    assert all(check.passed is None for check in checks)
    assert "not measured" in checks[0].row()


@pytest.mark.parametrize(("asyncio_rps", "faster"), [(900, "uvloop"), (1100, "asyncio")])
def test_loops_table_names_the_faster_loop(asyncio_rps: float, faster: str) -> None:
    samples = {"gateway": [sample(1000, 800)], "gateway-asyncio": [sample(asyncio_rps, 800)]}
    row = loops_table(samples, {"gateway": "uvloop", "gateway-asyncio": "asyncio"}).splitlines()[-1]
    assert row.startswith("| gateway | uvloop |") and row.endswith(f"| {faster} | uvloop |")  # equal CPU: default


def test_workers_table_flags_cpu_per_request_rising_with_a_worker_per_core() -> None:
    samples = {"gateway": [sample(1000, 800)], "gateway-workers-2": [sample(1900, 840)]}
    assert "(`gateway-workers-2` against `gateway`): +5% (target: must not rise; **missed**)" in workers_table(samples)


def test_workers_table_meets_the_target_when_cpu_per_request_holds() -> None:
    samples = {"gateway": [sample(1000, 800)], "gateway-workers-2": [sample(1900, 784)]}
    assert "-2% (target: must not rise; met)" in workers_table(samples)


def test_workers_table_sets_two_workers_on_one_core_beside_the_control() -> None:
    samples = {
        "minimal-proxy": [sample(500, 1600)],
        "minimal-proxy-2-cpu1": [sample(470, 1700)],
        "gateway": [sample(1000, 800)],
        "gateway-workers-2-cpu1": [sample(920, 880)],
    }
    table = workers_table(samples)
    assert "| minimal-proxy-2-cpu1 | 2 | 1 | 470 | 0.94x | 1700.0 | 1.06x |" in table
    assert "Two workers sharing one core (not a scaling setup; `gateway run` warns about it): +10%" in table
    assert "the minimal aiohttp proxy as two processes on one core: +6%" in table
    assert "target" not in table.splitlines()[-1]  # no verdict on it


def relay(rate: float, cpu_us: float, load_busy: float) -> WsSample:
    return WsSample(rate, 1.0, 2.0, cpu_us, 0.0, 0.0, load_busy)


def test_relay_table_says_when_the_load_core_bounded_the_round_trips() -> None:
    samples = {"ws-minimal": [relay(60_000, 16.0, 99.6)], "ws-gateway": [relay(58_000, 15.8, 100.0)]}
    table = relay_table(samples)
    assert "| 60,000 | 120,000 | 1.00 | 2.00 | 16.0 | 60,000 | 0 / 0 | 100 |" in table
    assert "The load core (the client and the echo backend) was busy 100% during `ws-minimal` and 100%" in table
    assert "ws-gateway / ws-minimal: round trips/s 0.97x (issue 8 target ≥ 1.00x: missed)" in table


def test_relay_table_says_nothing_of_a_load_core_with_room_left() -> None:
    samples = {"ws-minimal": [relay(40_000, 16.0, 80.0)], "ws-gateway": [relay(41_000, 15.0, 82.0)]}
    assert "The load core" not in relay_table(samples)
