"""Medians, the markdown tables, the machine description and the README results section."""

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
    single_p50_ms: float
    single_p99_ms: float
    other_load_pct: float  # share of the load core's time spent on work not ours (other processes, steal), %
    other_server_pct: float  # the same for the server core
    errors: int


def median(samples: list[Sample]) -> Sample:
    def mid(field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in samples))

    return Sample(
        rps=mid("rps"),
        p50_ms=mid("p50_ms"),
        p99_ms=mid("p99_ms"),
        cpu_us=mid("cpu_us"),
        single_p50_ms=mid("single_p50_ms"),
        single_p99_ms=mid("single_p99_ms"),
        other_load_pct=mid("other_load_pct"),
        other_server_pct=mid("other_server_pct"),
        errors=sum(s.errors for s in samples),
    )


def progress_line(label: str, target: str, s: Sample) -> str:
    return (
        f"{label} {target:<14} {s.rps:>9,.0f} rps  p50 {s.p50_ms:6.2f} ms  p99 {s.p99_ms:6.2f} ms"
        f"  {s.cpu_us:6.1f} µs/req  @1 conn p50 {s.single_p50_ms:5.2f} ms"
        f"  other {s.other_load_pct:.0f}%/{s.other_server_pct:.0f}%  errors {s.errors}"
    )


def noise_note(samples: dict[str, list[Sample]]) -> str:
    """One honest line on how shared the machine was while the aiohttp rows ran.

    They saturate CPU 1, so that core's foreign share is what disturbs them; CPU 0 idles
    at their rates and foreign work fills it without slowing them down."""
    server = sorted(s.other_server_pct for name, runs in samples.items() if name not in ("direct", "nginx-proxy")
                    for s in runs)  # fmt: skip
    if not server:
        return ""
    median_pct = server[len(server) // 2]
    verdict = (
        "the machine was shared (another session's work, hypervisor steal): absolute figures are low and move"
        " between rounds, so compare rows of this run with each other, by ratio and CPU µs/req"
        if median_pct > 10
        else "the machine was quiet enough for the absolute figures to mean something"
    )
    return (
        f"Noise: work not ours took {server[0]:.0f} to {server[-1]:.0f}% (median {median_pct:.0f}%) of CPU 1, the core"
        f" the aiohttp proxies saturate, across their measured runs; {verdict}."
    )


def results_table(samples: dict[str, list[Sample]]) -> str:
    lines = [
        "| target | rps | p50 ms | p99 ms | CPU µs/req | p50 ms @1 conn | p99 ms @1 conn | rps per round"
        " | other load % CPU 0 / 1 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, runs in samples.items():
        m = median(runs)
        per_round = " / ".join(f"{s.rps:,.0f}" for s in runs)
        lines.append(
            f"| {name} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.cpu_us:.1f} "
            f"| {m.single_p50_ms:.2f} | {m.single_p99_ms:.2f} | {per_round} "
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
    "JWT verification (issue 3.7)": ("gateway-jwt-hs256", "gateway-jwt-rs256-nocache", "gateway-jwt-rs256"),
    "Rate limit (issue 4.7)": ("gateway-rl-memory", "gateway-rl-redis"),
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
        f"| {base} | {plain.rps:,.0f} | | {plain.cpu_us:.1f} | | {plain.p99_ms:.2f} | {plain.single_p50_ms:.2f}"
        f" | {' / '.join(f'{s.rps:,.0f}' for s in samples[base])} | {plain.errors} |",
    ]
    for name in present:
        m = median(samples[name])
        lines.append(
            f"| {name} | {m.rps:,.0f} | {(1 - m.rps / plain.rps) * 100:.0f}% | {m.cpu_us:.1f}"
            f" | {m.cpu_us - plain.cpu_us:+.1f} | {m.p99_ms:.2f} | {m.single_p50_ms:.2f}"
            f" | {' / '.join(f'{s.rps:,.0f}' for s in samples[name])} | {m.errors} |"
        )
    return "\n".join(lines)


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


def loops_used(logs: dict[str, str]) -> str:
    """Which event loop each aiohttp server says it runs on, from its startup log."""
    used = []
    for name, text in logs.items():
        loop = "uvloop" if "uvloop" in text else "asyncio" if "asyncio" in text else "not stated in its log"
        used.append(f"{name}: {loop}")
    return "; ".join(used)


def environment(plan: str, logs: dict[str, str]) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- `uname -a`: `{_first_line(['uname', '-a'])}`",
        f"- CPU: {cpu_model()}",
        f"- python {sys.version.split()[0]}, aiohttp {_version('aiohttp')}, uvloop {_version('uvloop')}"
        + (f" (event loop used: {loops_used(logs)})" if logs else ""),
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
    samples: dict[str, list[Sample]], plan: str, logs: dict[str, str], costs: dict[str, dict[str, float]] | None = None
) -> str:
    """The README results section; ``plan`` says what was run, ``logs`` are the proxies' logs,
    ``costs`` what ``jwt_verify.py`` / ``rl_verify.py`` measured in process, by script."""
    costs = costs or {}
    in_process = {  # feature target -> (script, note, table)
        "gateway-jwt-rs256": ("jwt_verify.py", "In process (`jwt_verify.py`, pinned to CPU 1, no sockets):",
                              jwt_costs_table),
        "gateway-rl-redis": ("rl_verify.py", "In process (`rl_verify.py`, pinned to CPU 1, 64 concurrent callers,"
                             " Redis on CPU 0):", rl_costs_table),
    }  # fmt: skip
    parts = ["### Latest results", "", *environment(plan, logs)]
    if samples:
        parts += ["", results_table(samples), "", noise_note(samples)]
    if ratios := ratios_table(samples):
        parts += ["", ratios]
    for title, names in FEATURES.items():
        if table := feature_table(samples, names):
            parts += ["", f"#### {title}", "", table]
            for target, (script, note, render) in in_process.items():
                if target in names and script in costs:
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
