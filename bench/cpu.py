"""CPU accounting from /proc: per process tree, per core, and for reaped children (Linux only)."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from pathlib import Path


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3, the state, is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from one scan of /proc (share it when reading many trees)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))):
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    return parents


def descendants(root: int, parents: dict[int, list[int]] | None = None) -> list[int]:
    parents = process_children() if parents is None else parents
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_cpu_seconds(root: int, parents: dict[int, list[int]] | None = None) -> float:
    """utime+stime of a process and its descendants (``--workers`` forks, nginx workers), plus
    children they already reaped. ``parents``: a :func:`process_children` scan to reuse."""
    ticks = 0
    for pid in (root, *descendants(root, parents)):
        if fields := _proc_stat(pid):
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def core_seconds(cpus: Iterable[str]) -> dict[str, float]:
    """Per core in ``cpus``, the time it spent busy or stolen by the hypervisor (/proc/stat, since boot)."""
    wanted, cores = {f"cpu{cpu}" for cpu in cpus}, {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            cores[name[3:]] = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return cores


def reaped_children_seconds() -> float:
    """CPU time of this process's children that have exited and been waited for (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
