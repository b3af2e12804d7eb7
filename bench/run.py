"""Load benchmark: nginx direct, nginx proxy_pass, the minimal aiohttp proxy and the gateway.

The instrument of issue 8: starts an nginx static backend and the servers under test in a
private temp dir, drives each with wrk in alternating rounds, and prints (and writes into
bench/README.md) one table of medians, the issue 8 targets with their measured ratios, the
uvloop/asyncio and ``--workers`` comparisons, and the WebSocket relay and idle-memory
figures. Stdlib only; run it with the venv's python so the gateway and aiohttp versions
are the ones reported:

    .venv/bin/python bench/run.py [--duration 8] [--rounds 3] [--quick] [--targets issue8]

See bench/README.md for what is measured, the CPU pinning and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import features
import servers
import ws_bench
from report import README, Sample, WsFigures, environment, progress_line, results_section, write_readme
from servers import LOAD_CPU, SERVER_CPU, BenchError, CpuMeter, Lab, Target, start_lab
from wrk import wrk

CONNECTIONS = 64
STARTERS = {**servers.STARTERS, **features.STARTERS, **servers.ONE_MIB_STARTERS}
# The order of a round: pairs compared by a ratio run next to each other, so drift within a
# round touches both alike.
HTTP_TARGETS = (
    "direct",
    "nginx-proxy",
    "minimal-proxy",
    "gateway",
    "gateway-full-chain",
    "gateway-cache-hit",
    "gateway-cache-miss",
    "minimal-proxy-asyncio",
    "gateway-asyncio",
    "gateway-full-chain-asyncio",
    "minimal-proxy-2-cpu1",
    "gateway-workers-2-cpu1",
    "gateway-workers-2",
    "gateway-jwt-hs256",
    "gateway-jwt-rs256-nocache",
    "gateway-jwt-rs256",
    "gateway-rl-memory",
    "gateway-rl-redis",
    "direct-1mib",
    "nginx-proxy-1mib",
    "minimal-proxy-1mib",
    "gateway-1mib",
)
WS_TARGETS = ("ws-relay", "idle-memory")  # ws_bench.py: its own section of the README
TARGETS = (*HTTP_TARGETS, *WS_TARGETS)
GROUPS = {  # --targets shorthands
    "all": TARGETS,
    "issue8": (
        "direct",
        "minimal-proxy",
        "gateway",
        "gateway-full-chain",
        "gateway-cache-hit",
        "minimal-proxy-1mib",
        "gateway-1mib",
        "ws-relay",
        "idle-memory",
    ),
    "references": ("direct", "nginx-proxy", "minimal-proxy", "gateway"),
    "loops": (
        "minimal-proxy",
        "minimal-proxy-asyncio",
        "gateway",
        "gateway-asyncio",
        "gateway-full-chain",
        "gateway-full-chain-asyncio",
    ),
    "workers": ("minimal-proxy", "gateway", "minimal-proxy-2-cpu1", "gateway-workers-2-cpu1", "gateway-workers-2"),
    "1mib": ("direct-1mib", "nginx-proxy-1mib", "minimal-proxy-1mib", "gateway-1mib"),
    "features": ("gateway", *(name for name in features.STARTERS if not name.endswith("-asyncio"))),
    "ws": WS_TARGETS,
}
assert set(STARTERS) | set(servers.BACKEND_TARGETS) == set(HTTP_TARGETS)


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: int  # the measured run at CONNECTIONS connections
    single_seconds: int  # the 1-connection latency run
    warmup: int  # discarded, before each measured run

    @classmethod
    def for_duration(cls, seconds: int, rounds: int) -> Plan:
        return cls(rounds, seconds, single_seconds=max(1, seconds // 2), warmup=max(1, min(3, seconds // 5)))

    def total_seconds(self, targets: int, singles: int) -> int:
        return self.rounds * (targets * (self.warmup + self.seconds) + singles * self.single_seconds)

    def describe(self) -> str:
        rounds = f"{self.rounds} round{'s' if self.rounds != 1 else ''}"
        return (
            f"{rounds} of ({self.warmup} s warmup + {self.seconds} s at {CONNECTIONS} connections"
            f", and {self.single_seconds} s at 1 connection for direct, nginx-proxy, minimal-proxy and gateway)"
            " per target, alternating; medians"
        )


def measure(target: Target, lab: Lab, plan: Plan) -> Sample:
    """Warm up, then the loaded run (throughput, latency, CPU per request), then (for the
    targets that have one) the 1-connection run."""
    headers, unique = target.headers, target.unique_query
    wrk(target.url, CONNECTIONS, plan.warmup, headers, unique_query=unique)
    meter = CpuMeter(lab.servers)
    loaded = wrk(target.url, CONNECTIONS, plan.seconds, headers, unique_query=unique)
    cpu, foreign = meter.read()
    single = wrk(target.url, 1, plan.single_seconds, headers, unique_query=unique) if target.single else None
    return Sample(
        rps=loaded.rps,
        p50_ms=loaded.p50_ms,
        p99_ms=loaded.p99_ms,
        cpu_us=cpu[target.server.name] * 1e6 / loaded.requests,
        single_p50_ms=single.p50_ms if single else None,
        single_p99_ms=single.p99_ms if single else None,
        other_load_pct=foreign[LOAD_CPU] * 100,
        other_server_pct=foreign[SERVER_CPU] * 100,
        errors=loaded.errors + (single.errors if single else 0),
        mb_s=loaded.rps * len(target.body) / 1e6 if len(target.body) >= 1 << 20 else None,
    )


def run_rounds(lab: Lab, plan: Plan) -> dict[str, list[Sample]]:
    """A B C D, A B C D, ...: alternating spreads drift (thermal, neighbours) over all targets."""
    samples: dict[str, list[Sample]] = {t.name: [] for t in lab.targets}
    for round_no in range(1, plan.rounds + 1):
        for target in lab.targets:
            sample = measure(target, lab, plan)
            samples[target.name].append(sample)
            print(progress_line(f"round {round_no}/{plan.rounds}", target.name, sample), flush=True)
    return samples


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 s, 1 round, README left alone")
    parser.add_argument(
        "--targets",
        default="all",
        help=f"comma-separated targets or groups ({', '.join(GROUPS)}); targets: {', '.join(TARGETS)}",
    )
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, server logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.no_readme = 2, 1, True
    named = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(named) - set(TARGETS) - set(GROUPS):
        parser.error(f"unknown --targets {', '.join(sorted(unknown))}")
    wanted = {target for name in named for target in GROUPS.get(name, (name,))}
    args.targets = [target for target in TARGETS if target in wanted]  # in round order
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def check_tools() -> None:
    missing = [tool for tool in ("wrk", "taskset") if not shutil.which(tool)]
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        missing.append("nginx")
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run `bash bench/setup.sh` first")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 CPUs: the load generator and the server under test are pinned apart")


def raise_priority(niceness: int = -10) -> str:
    """Outrank whatever else runs on the machine; every process started later inherits it."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        return f"nice {os.getpriority(os.PRIO_PROCESS, 0)} (raising priority needs root)"
    return f"nice {niceness}"


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the ExitStack, which stops every server


def bench(args: argparse.Namespace) -> dict[str, str]:
    """Run the selected benchmarks; the README sections they produce, by marker name."""
    plan = Plan.for_duration(args.duration, args.rounds)
    priority = raise_priority()
    load = "load average before the run: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    conditions = f"{priority}; {load}"
    sections: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        work.chmod(0o755)  # nginx workers read the static files from here
        if args.keep:
            print(f"configs and logs kept in {work}", flush=True)
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)  # runs after the servers stop
        samples: dict[str, list[Sample]] = {}
        loops: dict[str, str] = {}
        costs: dict[str, dict[str, float]] = {}
        if http := [name for name in args.targets if name in HTTP_TARGETS]:
            lab = start_lab(http, STARTERS, work, stack)
            loops = {t.name: t.server.loop_used() for t in lab.targets}
            singles = sum(1 for t in lab.targets if t.single)
            names = ", ".join(t.name for t in lab.targets)
            print(f"measuring {names}: about {plan.total_seconds(len(lab.targets), singles)} s", flush=True)
            samples = run_rounds(lab, plan)
            costs = {
                script: features.in_process_costs(script)
                for script, prefix in (("jwt_verify.py", "gateway-jwt"), ("rl_verify.py", "gateway-rl"))
                if any(name.startswith(prefix) for name in http)
            }
        ws_figures = None
        if ws := [name for name in args.targets if name in WS_TARGETS]:
            sections["websocket"], ws_figures = websocket_section(ws, plan, conditions, work, stack)
        if http:
            described = f"{plan.describe()}; {conditions}"
            sections["results"] = results_section(samples, described, loops, costs, ws_figures)
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(s) for s in v] for k, v in samples.items()}, indent=2))
    return sections


def websocket_section(
    names: list[str], plan: Plan, conditions: str, work: Path, stack: contextlib.ExitStack
) -> tuple[str, WsFigures]:
    """Relay rate (``ws-relay``) and memory per idle connection (``idle-memory``): one README
    section, and the figures the issue 8 checks use."""
    ws_bench.raise_nofile()
    echo = ws_bench.start_echo(work, stack)
    seconds = max(1, plan.seconds // 2)
    warmup = max(1, plan.warmup)
    parts = ["### Latest WebSocket results", ""]
    relay, relay_samples = "", {}
    if "ws-relay" in names:
        targets = len(ws_bench.WS_TARGETS)
        print(f"measuring {', '.join(ws_bench.WS_TARGETS)}: about {plan.rounds * targets * (warmup + seconds + 1)} s")
        relay_samples = ws_bench.run_relay(plan.rounds, warmup, seconds, work, stack, echo)
        relay = ws_bench.relay_table(relay_samples)
    idle_samples = ws_bench.run_idle(work, stack, echo) if "idle-memory" in names else []
    idle = ws_bench.idle_table(idle_samples) if idle_samples else ""
    plan_text = (
        f"relay: {plan.rounds} rounds of ({warmup} s warmup + {seconds} s) per target, alternating, medians;"
        f" {ws_bench.CLIENTS} sockets x {ws_bench.MESSAGE_BYTES}-byte text round trips; {conditions}"
    )
    parts += [*environment(plan_text, {}), ""]
    if relay:
        parts += ["#### Relay rate and round trips (issues 6.5 and 8)", "", relay, ""]
    if idle:
        parts += ["#### Memory per idle connection (issues 6.5 and 8)", "", idle, ""]
    figures = WsFigures(
        relay={name: (m.rate, m.cpu_us) for name, m in ws_bench.relay_medians(relay_samples).items()},
        idle_kib={s.what: s.per_connection_kib for s in idle_samples},
    )
    return "\n".join(parts), figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        check_tools()
        sections = bench(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    titles = {"results": "Results", "websocket": "WebSocket results"}
    for marker in [m for m in ("websocket", "results") if m in sections]:  # the issue 8 checks print last
        section = sections[marker]
        print()
        print(section)
        if not args.no_readme:
            write_readme(section, marker=marker, title=titles[marker])
    if sections and not args.no_readme:
        print(f"results written to {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
