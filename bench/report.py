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
MARK_START = "<!-- bench:results:start -->"
MARK_END = "<!-- bench:results:end -->"


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


def results_section(samples: dict[str, list[Sample]], plan: str, logs: dict[str, str]) -> str:
    """The README results section; ``plan`` says what was run, ``logs`` are the proxies' logs."""
    parts = ["### Latest results", "", *environment(plan, logs), "", results_table(samples)]
    if ratios := ratios_table(samples):
        parts += ["", ratios]
    return "\n".join(parts) + "\n"


def write_readme(section: str, readme: Path = README) -> None:
    """Replace what is between the result markers, keeping the explanatory text around them."""
    block = f"{MARK_START}\n{section}{MARK_END}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(MARK_END) :]
    else:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{block}\n"
    readme.write_text(text)
