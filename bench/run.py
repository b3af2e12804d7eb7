"""Load benchmark: nginx direct, nginx proxy_pass, the minimal aiohttp proxy and the gateway.

Issue 2 point 9 (and the instrument issue 8 grows): starts an nginx static backend and
the servers under test in a private temp dir, drives each with wrk in alternating rounds,
and prints (and writes into bench/README.md) one table of medians. Stdlib only; run it
with the venv's python so the gateway and aiohttp versions are the ones reported:

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--quick]

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
from report import README, Sample, environment, progress_line, results_section, write_readme
from servers import LOAD_CPU, SERVER_CPU, BenchError, CpuMeter, Lab, Target, start_lab
from wrk import wrk

CONNECTIONS = 64
STARTERS = {**servers.STARTERS, **features.STARTERS}
HTTP_TARGETS = ("direct", *STARTERS)
WS_TARGETS = ("ws-relay", "idle-memory")  # ws_bench.py: its own section of the README
TARGETS = (*HTTP_TARGETS, *WS_TARGETS)


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: int  # the measured run at CONNECTIONS connections
    single_seconds: int  # the 1-connection latency run
    warmup: int  # discarded, before each measured run

    @classmethod
    def for_duration(cls, seconds: int, rounds: int) -> Plan:
        return cls(rounds, seconds, single_seconds=max(1, seconds // 2), warmup=max(1, min(3, seconds // 5)))

    def total_seconds(self, targets: int) -> int:
        return self.rounds * targets * (self.warmup + self.seconds + self.single_seconds)

    def describe(self) -> str:
        rounds = f"{self.rounds} round{'s' if self.rounds != 1 else ''}"
        return (
            f"{rounds} of ({self.warmup} s warmup + {self.seconds} s at {CONNECTIONS} connections"
            f" + {self.single_seconds} s at 1 connection) per target, alternating; medians"
        )


def measure(target: Target, lab: Lab, plan: Plan) -> Sample:
    """Warm up, then the loaded run (throughput, latency, CPU per request), then 1 connection."""
    wrk(target.url, CONNECTIONS, plan.warmup, target.headers)
    meter = CpuMeter(lab.servers)
    loaded = wrk(target.url, CONNECTIONS, plan.seconds, target.headers)
    cpu, foreign = meter.read()
    single = wrk(target.url, 1, plan.single_seconds, target.headers)
    return Sample(
        rps=loaded.rps,
        p50_ms=loaded.p50_ms,
        p99_ms=loaded.p99_ms,
        cpu_us=cpu[target.server.name] * 1e6 / loaded.requests,
        single_p50_ms=single.p50_ms,
        single_p99_ms=single.p99_ms,
        other_load_pct=foreign[LOAD_CPU] * 100,
        other_server_pct=foreign[SERVER_CPU] * 100,
        errors=loaded.errors + single.errors,
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
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, server logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.no_readme = 2, 1, True
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown --targets {', '.join(sorted(unknown))}")
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
        work.chmod(0o755)  # nginx workers read the static file from here
        if args.keep:
            print(f"configs and logs kept in {work}", flush=True)
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)  # runs after the servers stop
        samples: dict[str, list[Sample]] = {}
        if http := [name for name in args.targets if name in HTTP_TARGETS]:
            lab = start_lab(http, STARTERS, work, stack)
            names = ", ".join(t.name for t in lab.targets)
            print(f"measuring {names}: about {plan.total_seconds(len(lab.targets))} s", flush=True)
            samples = run_rounds(lab, plan)
            logs = {t.name: t.server.log_head() for t in lab.targets if t.name in ("minimal-proxy", "gateway")}
            costs = {
                script: features.in_process_costs(script)
                for script, prefix in (("jwt_verify.py", "gateway-jwt"), ("rl_verify.py", "gateway-rl"))
                if any(name.startswith(prefix) for name in http)
            }
            sections["results"] = results_section(samples, f"{plan.describe()}; {conditions}", logs, costs)
        if ws := [name for name in args.targets if name in WS_TARGETS]:
            sections["websocket"] = websocket_section(ws, plan, conditions, work, stack)
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(s) for s in v] for k, v in samples.items()}, indent=2))
    return sections


def websocket_section(names: list[str], plan: Plan, conditions: str, work: Path, stack: contextlib.ExitStack) -> str:
    """Relay rate (``ws-relay``) and memory per idle connection (``idle-memory``): one README section."""
    ws_bench.raise_nofile()
    echo = ws_bench.start_echo(work, stack)
    seconds = max(1, plan.seconds // 2)
    warmup = max(1, plan.warmup)
    parts = ["### Latest WebSocket results", ""]
    relay = ""
    if "ws-relay" in names:
        print(f"measuring {', '.join(ws_bench.WS_TARGETS)}: about {plan.rounds * 3 * (warmup + seconds + 1)} s")
        relay = ws_bench.relay_table(ws_bench.run_relay(plan.rounds, warmup, seconds, work, stack, echo))
    idle = ws_bench.idle_table(ws_bench.run_idle(work, stack, echo)) if "idle-memory" in names else ""
    plan_text = (
        f"relay: {plan.rounds} rounds of ({warmup} s warmup + {seconds} s) per target, alternating, medians;"
        f" {ws_bench.CLIENTS} sockets x {ws_bench.MESSAGE_BYTES}-byte text round trips; {conditions}"
    )
    parts += [*environment(plan_text, {}), ""]
    if relay:
        parts += ["#### Relay rate and round trips (issue 6.5)", "", relay, ""]
    if idle:
        parts += ["#### Memory per idle connection (issue 6.5; issue 8 for HTTP)", "", idle, ""]
    return "\n".join(parts)


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
    for marker, section in sections.items():
        print()
        print(section)
        if not args.no_readme:
            write_readme(section, marker=marker, title=titles[marker])
    if sections and not args.no_readme:
        print(f"results written to {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
