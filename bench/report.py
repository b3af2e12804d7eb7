"""Medians, the markdown tables, the issue 8 checks, the machine description and the README sections."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


@dataclass(frozen=True)
class Sample:
    """One target in one round."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # CPU time of the server under test per request, in microseconds
    single_p50_ms: float | None  # the 1-connection run, for the targets that have one
    single_p99_ms: float | None
    other_load_pct: float  # share of the load core's time spent on work not ours (other processes, steal), %
    other_server_pct: float  # the same for the server core
    errors: int
    mb_s: float | None = None  # response bodies, MB/s (10^6 bytes), for the large-body targets


def median(samples: list[Sample]) -> Sample:
    def mid(field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in samples))

    def maybe(field: str) -> float | None:
        values = [getattr(s, field) for s in samples]
        return None if None in values else float(statistics.median(values))

    return Sample(
        rps=mid("rps"),
        p50_ms=mid("p50_ms"),
        p99_ms=mid("p99_ms"),
        cpu_us=mid("cpu_us"),
        single_p50_ms=maybe("single_p50_ms"),
        single_p99_ms=maybe("single_p99_ms"),
        other_load_pct=mid("other_load_pct"),
        other_server_pct=mid("other_server_pct"),
        errors=sum(s.errors for s in samples),
        mb_s=maybe("mb_s"),
    )


def _opt(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def progress_line(label: str, target: str, s: Sample) -> str:
    single = f"  @1 conn p50 {s.single_p50_ms:5.2f} ms" if s.single_p50_ms is not None else ""
    mb_s = f"  {s.mb_s:7,.0f} MB/s" if s.mb_s is not None else ""
    return (
        f"{label} {target:<26} {s.rps:>9,.0f} rps{mb_s}  p50 {s.p50_ms:6.2f} ms  p99 {s.p99_ms:6.2f} ms"
        f"  {s.cpu_us:7.1f} µs/req{single}  other {s.other_load_pct:.0f}%/{s.other_server_pct:.0f}%"
        f"  errors {s.errors}"
    )


def _saturates_server_core(name: str) -> bool:
    """The aiohttp rows: nginx (direct or proxying) is bound by CPU 0; workers-2 spans both cores."""
    return not name.startswith(("direct", "nginx-proxy")) and name != "gateway-workers-2"


def noise_note(samples: dict[str, list[Sample]]) -> str:
    """One honest line on how shared the machine was while the aiohttp rows ran.

    They saturate CPU 1, so that core's foreign share is what disturbs them most. CPU 0
    (wrk, the backend, Redis) idles at their rates and foreign work mostly fills that idle
    time, but at a high share it also delays the load generator."""
    rows = [s for name, runs in samples.items() if _saturates_server_core(name) for s in runs]
    if not rows:
        return ""
    server = sorted(s.other_server_pct for s in rows)
    load = sorted(s.other_load_pct for s in rows)
    median_server, median_load = server[len(server) // 2], load[len(load) // 2]
    verdict = (
        "the machine was shared (another session's work, hypervisor steal): absolute figures are low and move"
        " between rounds, so compare rows of this run with each other, by ratio and CPU µs/req"
        if median_server > 10 or median_load > 50
        else "the machine was quiet enough for the absolute figures to mean something"
    )
    return (
        f"Noise: work not ours took {server[0]:.0f} to {server[-1]:.0f}% (median {median_server:.0f}%) of CPU 1, the"
        f" core the aiohttp proxies saturate, across their measured runs, and {load[0]:.0f} to {load[-1]:.0f}%"
        f" (median {median_load:.0f}%) of CPU 0, the load core; {verdict}."
    )


def results_table(samples: dict[str, list[Sample]]) -> str:
    lines = [
        "| target | rps | MB/s | p50 ms | p99 ms | CPU µs/req | p50 ms @1 conn | p99 ms @1 conn | rps per round"
        " | other load % CPU 0 / 1 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, runs in samples.items():
        m = median(runs)
        per_round = " / ".join(f"{s.rps:,.0f}" for s in runs)
        lines.append(
            f"| {name} | {m.rps:,.0f} | {_opt(m.mb_s, ',.0f')} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.cpu_us:.1f} "
            f"| {_opt(m.single_p50_ms)} | {_opt(m.single_p99_ms)} | {per_round} "
            f"| {m.other_load_pct:.0f} / {m.other_server_pct:.0f} | {m.errors} |"
        )
    return "\n".join(lines)


def ratios_table(samples: dict[str, list[Sample]], subject: str = "gateway") -> str:
    """The subject's medians over each reference's (rps: higher is better; the rest: lower)."""
    if subject not in samples:
        return ""
    lines = ["| ratio | rps | p99 | CPU µs/req |", "| --- | ---: | ---: | ---: |"]
    ours = median(samples[subject])
    for reference in ("nginx-proxy", "minimal-proxy"):
        if reference in samples:
            ref = median(samples[reference])
            lines.append(
                f"| {subject} / {reference} | {ours.rps / ref.rps:.2f}x | {ours.p99_ms / ref.p99_ms:.2f}x "
                f"| {ours.cpu_us / ref.cpu_us:.2f}x |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


FEATURES = {  # README section title -> the targets that are the plain gateway plus that feature
    "Full chain (issue 8) and its parts": (
        "gateway-jwt-hs256",
        "gateway-rl-redis",
        "gateway-cache-miss",
        "gateway-full-chain",
    ),
    "JWT verification (issue 3.7)": ("gateway-jwt-hs256", "gateway-jwt-rs256-nocache", "gateway-jwt-rs256"),
    "Rate limit (issue 4.7)": ("gateway-rl-memory", "gateway-rl-redis"),
    "Cache (issue 5.7)": ("gateway-cache-miss", "gateway-cache-hit"),
}


def feature_table(samples: dict[str, list[Sample]], names: tuple[str, ...], base: str = "gateway") -> str:
    """What one feature costs over the plain gateway of the same run: throughput lost, CPU added."""
    present = [name for name in names if name in samples]
    if base not in samples or not present:
        return ""
    plain = median(samples[base])
    lines = [
        f"| target | rps | throughput cost vs `{base}` | CPU µs/req | added CPU µs/req | p99 ms | p50 ms @1 conn"
        " | rps per round | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        f"| {base} | {plain.rps:,.0f} | | {plain.cpu_us:.1f} | | {plain.p99_ms:.2f} | {_opt(plain.single_p50_ms)}"
        f" | {' / '.join(f'{s.rps:,.0f}' for s in samples[base])} | {plain.errors} |",
    ]
    for name in present:
        m = median(samples[name])
        lines.append(
            f"| {name} | {m.rps:,.0f} | {(1 - m.rps / plain.rps) * 100:.0f}% | {m.cpu_us:.1f}"
            f" | {m.cpu_us - plain.cpu_us:+.1f} | {m.p99_ms:.2f} | {_opt(m.single_p50_ms)}"
            f" | {' / '.join(f'{s.rps:,.0f}' for s in samples[name])} | {m.errors} |"
        )
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def feature_verdicts(samples: dict[str, list[Sample]], title: str) -> str:
    """The issue's own target for a feature section, when the run has what it needs."""
    m = {name: median(runs) for name, runs in samples.items()}
    if title.startswith("Rate limit") and {"gateway", "gateway-rl-redis"} <= m.keys():
        cost = 1 - m["gateway-rl-redis"].rps / m["gateway"].rps
        verdict = _met(cost < 0.25)
        return f"Redis-backed limit: {cost * 100:.0f}% of the plain gateway's throughput (target < 25%: {verdict})."
    if title.startswith("Cache") and {"gateway-cache-hit", "gateway-cache-miss"} <= m.keys():
        hit, miss = m["gateway-cache-hit"], m["gateway-cache-miss"]
        verdict = _met(hit.rps >= 3 * miss.rps)
        text = f"Cache hit / miss: {hit.rps / miss.rps:.2f}x the throughput (target ≥ 3x: {verdict})"
        if "direct" in m:
            text += f"; a hit is {hit.rps / m['direct'].rps:.2f}x nginx serving the body statically (`direct`)"
        return text + "."
    return ""


# --- issue 8 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One issue 8 target: what was compared, the value, the goal and whether it was met."""

    goal: str
    compared: str  # the figures the value comes from
    value: str
    target: str
    passed: bool | None  # None: not measured in this run
    by_cpu: str = ""  # the same comparison by CPU µs per request (reference ÷ ours: above 1 is better)
    rounds: str = ""  # the ratio within each round (ours and the reference measured next to each other)

    def row(self) -> str:
        verdict = "not measured" if self.passed is None else _met(self.passed)
        return (
            f"| {self.goal} | {self.compared} | {self.value} | {self.target} | {self.by_cpu} | {self.rounds}"
            f" | {verdict} |"
        )


@dataclass(frozen=True)
class WsFigures:
    """What ``ws_bench.py`` measured, as the issue 8 checks need it."""

    relay: dict[str, tuple[float, float]]  # target -> (round trips/s, CPU µs per round trip), medians
    idle_kib: dict[str, float]  # "gateway, idle WebSocket" / "gateway, idle keep-alive HTTP" -> KiB each


def _throughput(sample: Sample, unit: str) -> float:
    return (sample.mb_s or 0.0) if unit == "MB/s" else sample.rps


def _higher(
    goal: str, samples: dict[str, list[Sample]], ours: str, ref: str, minimum: float, unit: str = "rps"
) -> Check:
    """Throughput (``rps`` or ``MB/s``): ours over the reference's medians, at least ``minimum``;
    with the same ratio round by round, to show how far the run's noise moves it."""
    target = f"≥ {minimum:.2f}x"
    if ours not in samples or ref not in samples:
        return Check(goal, f"`{ours}` / `{ref}`", "", target, None)
    a, b = median(samples[ours]), median(samples[ref])
    va, vb = _throughput(a, unit), _throughput(b, unit)
    ratio = va / vb if vb else 0.0
    paired = zip(samples[ours], samples[ref], strict=False)
    rounds = " / ".join(f"{_throughput(x, unit) / y_rate:.2f}x" for x, y in paired if (y_rate := _throughput(y, unit)))
    return Check(goal, f"`{ours}` {va:,.0f} / `{ref}` {vb:,.0f} {unit}", f"{ratio:.2f}x", target,
                 ratio >= minimum, f"{b.cpu_us / a.cpu_us:.2f}x", rounds)  # fmt: skip


def issue8_checks(samples: dict[str, list[Sample]], ws: WsFigures | None) -> list[Check]:
    m = {name: median(runs) for name, runs in samples.items()}
    checks = [
        _higher("plain proxied GET", samples, "gateway", "minimal-proxy", 1.25),
        _higher("full chain (HS256 + Redis limit + cache miss)", samples, "gateway-full-chain", "minimal-proxy", 1.0),
        _higher("cache hit", samples, "gateway-cache-hit", "minimal-proxy", 3.0),
    ]
    goal = "p99 at 64 connections"
    if {"gateway", "minimal-proxy"} <= m.keys():
        ours, ref = m["gateway"].p99_ms, m["minimal-proxy"].p99_ms
        checks.append(Check(goal, f"`gateway` {ours:.2f} / `minimal-proxy` {ref:.2f} ms", f"{ours / ref:.2f}x",
                            "≤ 1.00x", ours <= ref))  # fmt: skip
    else:
        checks.append(Check(goal, "`gateway` / `minimal-proxy`", "", "≤ 1.00x", None))
    goal = "added p50 at 1 connection, over `direct`"
    singles = {name: m[name].single_p50_ms for name in ("direct", "minimal-proxy", "gateway") if name in m}
    direct, gateway = singles.get("direct"), singles.get("gateway")
    if direct is not None and gateway is not None:
        minimal = singles.get("minimal-proxy")
        also = f"; `minimal-proxy` adds {minimal - direct:.2f}" if minimal is not None else ""
        added = gateway - direct
        checks.append(Check(goal, f"`gateway` {gateway:.2f} minus `direct` {direct:.2f} ms{also}", f"{added:.2f} ms",
                            "≤ 0.50 ms", added <= 0.5))  # fmt: skip
    else:
        checks.append(Check(goal, "`gateway` minus `direct`", "", "≤ 0.50 ms", None))
    checks.append(_higher("1 MiB bodies", samples, "gateway-1mib", "minimal-proxy-1mib", 1.1, "MB/s"))
    goal, target = "WebSocket relay round trips", "≥ 1.00x"
    relay = ws.relay if ws else {}
    if {"ws-gateway", "ws-minimal"} <= relay.keys():
        (ours_rate, ours_cpu), (ref_rate, ref_cpu) = relay["ws-gateway"], relay["ws-minimal"]
        checks.append(Check(goal, f"`ws-gateway` {ours_rate:,.0f} / `ws-minimal` {ref_rate:,.0f} round trips/s",
                            f"{ours_rate / ref_rate:.2f}x", target, ours_rate >= ref_rate,
                            f"{ref_cpu / ours_cpu:.2f}x"))  # fmt: skip
    else:
        checks.append(Check(goal, "`ws-gateway` / `ws-minimal`", "", target, None))
    idle = ws.idle_kib if ws else {}
    for what, limit in (("gateway, idle keep-alive HTTP", 10.0), ("gateway, idle WebSocket", 40.0)):
        goal = f"memory per {what.removeprefix('gateway, ')} connection"
        kib = idle.get(what)
        value = "" if kib is None else f"{kib:.2f} KiB"
        checks.append(Check(goal, f"`idle-memory`: {what}", value, f"≤ {limit:.0f} KiB",
                            None if kib is None else kib <= limit))  # fmt: skip
    return checks


def issue8_table(checks: list[Check]) -> str:
    lines = [
        "| issue 8.2 target | compared (medians) | measured | target | by CPU µs/req | each round | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *(check.row() for check in checks),
    ]
    met = sum(1 for c in checks if c.passed)
    measured = sum(1 for c in checks if c.passed is not None)
    return "\n".join(lines) + f"\n\n{met} of {measured} measured targets met."


LOOP_PAIRS = (  # default loop (uvloop when installed) -> the same target forced onto asyncio
    ("minimal-proxy", "minimal-proxy-asyncio"),
    ("gateway", "gateway-asyncio"),
    ("gateway-full-chain", "gateway-full-chain-asyncio"),
)


def loops_table(samples: dict[str, list[Sample]], loops: dict[str, str]) -> str:
    """Issue 8.3: each configuration on its default loop and on asyncio, in the same rounds.

    Two verdicts: by rps, and by CPU µs/req, which a busy machine disturbs less (they agree
    on a quiet one, where the pinned server's core is the bottleneck)."""
    m = {name: median(runs) for name, runs in samples.items()}
    lines = [
        "| configuration | default loop | rps | CPU µs/req | p99 ms | forced onto | rps | CPU µs/req | p99 ms"
        " | rps default / other | CPU default / other | faster by rps | cheaper by CPU |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for default, other in LOOP_PAIRS:
        if default in m and other in m:
            a, b = m[default], m[other]
            mine, theirs = loops.get(default, "?"), loops.get(other, "?")
            lines.append(
                f"| {default} | {mine} | {a.rps:,.0f} | {a.cpu_us:.1f} | {a.p99_ms:.2f}"
                f" | {theirs} | {b.rps:,.0f} | {b.cpu_us:.1f} | {b.p99_ms:.2f} | {a.rps / b.rps:.2f}x"
                f" | {a.cpu_us / b.cpu_us:.2f}x | {mine if a.rps >= b.rps else theirs}"
                f" | {mine if a.cpu_us <= b.cpu_us else theirs} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


WORKERS = (  # target -> (its one-process row, processes, the cores they may use)
    ("minimal-proxy", "minimal-proxy", 1, "1"),
    ("minimal-proxy-2-cpu1", "minimal-proxy", 2, "1"),
    ("gateway", "gateway", 1, "1"),
    ("gateway-workers-2-cpu1", "gateway", 2, "1"),
    ("gateway-workers-2", "gateway", 2, "0 and 1 (0 shared with wrk and the backend)"),
)
SCALING = "gateway-workers-2"  # a worker per core: what the target judges
SHARED = ("gateway-workers-2-cpu1", "minimal-proxy-2-cpu1")  # two processes on one core, and the control


def workers_table(samples: dict[str, list[Sample]]) -> str:
    """Issue 8.3: ``--workers`` scaling; CPU µs/req is summed over every process.

    The target (CPU µs per request must not rise with workers) is judged where workers scale: one
    per core (``gateway-workers-2``). Two workers on one core are reported beside the minimal
    aiohttp proxy as two processes on one core (the control): what sharing a core's caches between
    two interpreters costs any aiohttp app, in the same run. ``gateway run`` warns about that setup."""
    m = {name: median(runs) for name, runs in samples.items()}
    if "gateway" not in m or not any(name in m for name in (SCALING, *SHARED)):
        return ""
    lines = [
        "| target | processes | CPUs | rps | rps vs 1 process | CPU µs/req, all processes | CPU vs 1 process | p99 ms"
        " | other load % CPU 0 / 1 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, one, processes, cpus in WORKERS:
        if name in m and one in m:
            s, base = m[name], m[one]
            lines.append(
                f"| {name} | {processes} | {cpus} | {s.rps:,.0f} | {s.rps / base.rps:.2f}x | {s.cpu_us:.1f}"
                f" | {s.cpu_us / base.cpu_us:.2f}x | {s.p99_ms:.2f}"
                f" | {s.other_load_pct:.0f} / {s.other_server_pct:.0f} |"
            )

    def change(name: str, one: str) -> str:
        percent = round((m[name].cpu_us / m[one].cpu_us - 1) * 100)
        return f"{percent:+d}%" if percent else "0%"

    notes = []
    if SCALING in m:
        rose = m[SCALING].cpu_us > m["gateway"].cpu_us
        notes.append(
            f"CPU µs per request with a worker per core (`{SCALING}` against `gateway`): {change(SCALING, 'gateway')}"
            f" (target: must not rise; {'**missed**' if rose else 'met'})."
        )
    gateway_shared, control = SHARED
    if gateway_shared in m:
        control_note = (
            f"; the minimal aiohttp proxy as two processes on one core: {change(control, 'minimal-proxy')}"
            if control in m and "minimal-proxy" in m
            else ""
        )
        notes.append(
            f"Two workers sharing one core (not a scaling setup; `gateway run` warns about it):"
            f" {change(gateway_shared, 'gateway')}{control_note}."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(argv: list[str]) -> str:
    """First line a command prints (nginx -v writes to stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()}, {os.cpu_count()} CPUs"
    return "?"


def loops_used(loops: dict[str, str]) -> str:
    """Which event loop each aiohttp server said it runs on in its startup log, grouped by loop."""
    by_loop: dict[str, list[str]] = {}
    for name, loop in loops.items():
        if loop:  # nginx says nothing
            by_loop.setdefault(loop, []).append(name)
    return "; ".join(f"{loop}: {', '.join(names)}" for loop, names in by_loop.items())


def environment(plan: str, loops: dict[str, str]) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- `uname -a`: `{_first_line(['uname', '-a'])}`",
        f"- CPU: {cpu_model()}",
        f"- python {sys.version.split()[0]}, aiohttp {_version('aiohttp')}, uvloop {_version('uvloop')}"
        + (f" (event loop each server used, from its log: {loops_used(loops)})" if loops_used(loops) else ""),
        f"- {_first_line(['nginx', '-v'])}, {_first_line(['wrk', '-v']).partition(' Copyright')[0]}",
        f"- {plan}",
    ]


def jwt_costs_table(costs: dict[str, float]) -> str:
    """``jwt_verify.py``'s figures: µs per request through the auth middleware, cache off and on."""
    lines = [
        "| algorithm | µs per request, cache off | µs per request, cache hit | saved |",
        "| --- | ---: | ---: | ---: |",
    ]
    for algorithm in ("HS256", "RS256"):
        off, on = costs.get(f"{algorithm}, no cache"), costs.get(f"{algorithm}, cache")
        if off is not None and on is not None:
            lines.append(f"| {algorithm} | {off:.1f} | {on:.1f} | {off - on:.1f} µs ({(1 - on / off) * 100:.0f}%) |")
    return "\n".join(lines)


def rl_costs_table(costs: dict[str, float]) -> str:
    """``rl_verify.py``'s figures: CPU µs per request through the rate-limit middleware, per store."""
    lines = ["| store | CPU µs per request in the gateway process |", "| --- | ---: |"]
    lines += [f"| {store} | {us:.1f} |" for store, us in costs.items()]
    return "\n".join(lines)


def results_section(
    samples: dict[str, list[Sample]],
    plan: str,
    loops: dict[str, str],
    costs: dict[str, dict[str, float]] | None = None,
    ws: WsFigures | None = None,
) -> str:
    """The README results section; ``plan`` says what was run, ``loops`` which event loop each
    server used, ``costs`` what ``jwt_verify.py`` / ``rl_verify.py`` measured in process, by
    script, and ``ws`` the WebSocket figures of the same run (for the issue 8 checks)."""
    costs = costs or {}
    in_process = {  # feature target -> (script, note, table)
        "gateway-jwt-rs256": ("jwt_verify.py", "In process (`jwt_verify.py`, pinned to CPU 1, no sockets):",
                              jwt_costs_table),
        "gateway-rl-redis": ("rl_verify.py", "In process (`rl_verify.py`, pinned to CPU 1, 64 concurrent callers,"
                             " Redis on CPU 0):", rl_costs_table),
    }  # fmt: skip
    parts = ["### Latest results", "", *environment(plan, loops)]
    if samples:
        parts += ["", results_table(samples), "", noise_note(samples)]
    parts += ["", "#### Issue 8 targets (ratios of this run's medians)", "", issue8_table(issue8_checks(samples, ws))]
    if table := loops_table(samples, loops):
        parts += ["", "#### uvloop and asyncio (issue 8.3)", "", table]
    if table := workers_table(samples):
        parts += ["", "#### `--workers` (issue 8.3)", "", table]
    if ratios := ratios_table(samples):
        parts += ["", "#### The gateway against the references", "", ratios]
    for title, names in FEATURES.items():
        if table := feature_table(samples, names):
            parts += ["", f"#### {title}", "", table]
            if verdict := feature_verdicts(samples, title):
                parts += ["", verdict]
            for target, (script, note, render) in in_process.items():
                if target in names and script in costs and not title.startswith("Full chain"):
                    parts += ["", note, "", render(costs[script])]
    return "\n".join(parts) + "\n"


def write_readme(section: str, readme: Path = README, *, marker: str = "results", title: str = "Results") -> None:
    """Replace what is between the ``bench:<marker>`` markers, keeping the text around them
    (a missing pair is appended under a ``## <title>`` heading)."""
    mark_start, mark_end = f"<!-- bench:{marker}:start -->", f"<!-- bench:{marker}:end -->"
    block = f"{mark_start}\n{section}{mark_end}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = text.find(mark_start), text.find(mark_end)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(mark_end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    readme.write_text(text)
