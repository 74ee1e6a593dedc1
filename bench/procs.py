"""What the benchmark reads about processes and the machine: peak memory, usable cores, load."""

from __future__ import annotations

import os
import time
from pathlib import Path

from infra.procfs import children, stat_fields


def cores() -> int:
    """Cores this process may run on (what the workers, the model and the limit all share)."""
    return len(os.sched_getaffinity(0))


def load_average() -> float:
    """One-minute load average: other work on a shared machine shows here and skews every number."""
    return os.getloadavg()[0]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children(current)
    return out


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of one process, in MiB; 0 when it is gone."""
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of one process now, in MiB; 0 when it is gone."""
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peaks of a process and its descendants (e.g. a Celery worker and its pool children)."""
    return sum(peak_rss_mb(p) for p in tree(pid))


TICKS = os.sysconf("SC_CLK_TCK")
ALL_CORES = os.sched_getaffinity(0)  # as the bench started, before any pinning


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (its reaped children included)."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return 0.0
    # after the command name: state is field 3, utime/stime/cutime/cstime are fields 14-17 (1-based)
    return sum(int(value) for value in fields[11:15]) / TICKS


def stack_pids(home: Path) -> dict[str, int]:
    """The local stack's processes by name, from its pid files (``infra/stack.py``, ``infra/ceph.sh``)."""
    found: dict[str, int] = {}
    for pid_file in [*(home / "run").glob("*.pid"), *(home / "ceph" / "run").glob("*.pid")]:
        try:
            pid = int(pid_file.read_text().split()[0])  # (ours also hold the start time: infra/procfs.py, pid_record)
        except (OSError, ValueError, IndexError):
            continue
        if Path(f"/proc/{pid}").exists():
            found[pid_file.stem] = pid
    return found


def stack_cpu_seconds(home: Path) -> dict[str, float]:
    """CPU seconds so far of each stack process, its pool children included."""
    return {name: sum(cpu_seconds(p) for p in tree(pid)) for name, pid in stack_pids(home).items()}


def _busy(line: str) -> float:
    values = [int(v) for v in line.split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``), all users included."""
    return _busy(Path("/proc/stat").read_text().split("\n", 1)[0])


def core_busy_seconds() -> dict[int, float]:
    """CPU seconds each core the bench may use has spent busy since boot, all users included."""
    return {int(line.split()[0][3:]): _busy(line) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("cpu") and line[3].isdigit() and int(line.split()[0][3:]) in ALL_CORES}


def pin(pids: list[int], cpus: set[int]) -> None:
    """Confine every thread of ``pids`` to ``cpus``; threads and processes they start later inherit it."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError):
                continue  # a thread that ended meanwhile


class CpuMeter:
    """CPU used during a step: by this process, by the given stack's processes, and by the whole machine.

    What the machine used beyond ours is other people's work on a shared machine: it skews the step's timing.
    """

    def __init__(self, home: Path | None = None, pids: dict[str, int] | None = None) -> None:
        self.home = home
        self.pids = pids or {}
        self.started = time.perf_counter()
        self.machine = machine_busy_seconds()
        self.cores = core_busy_seconds()
        self.own = time.process_time()
        self.stack = self._processes()

    def _processes(self) -> dict[str, float]:
        found = stack_cpu_seconds(self.home) if self.home else {}
        return {**found, **{name: sum(cpu_seconds(p) for p in tree(pid)) for name, pid in self.pids.items()}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def report(self, images: int) -> dict[str, object]:
        wall = self.elapsed()
        machine = machine_busy_seconds() - self.machine
        own = time.process_time() - self.own
        stack = {name: value - self.stack.get(name, 0.0) for name, value in self._processes().items()}
        ours = own + sum(stack.values())
        per_core = {core: busy - self.cores.get(core, busy) for core, busy in core_busy_seconds().items()}
        return {
            "cpu_ms_per_image": round(ours * 1000 / images, 2),
            "bench_process_cpu_ms_per_image": round(own * 1000 / images, 2),
            "stack_cpu_ms_per_image": {name: round(v * 1000 / images, 2) for name, v in stack.items()},
            "machine_busy_share": round(machine / (wall * len(ALL_CORES)), 3),
            "others_cpu_share": round(max(0.0, machine - ours) / (wall * len(ALL_CORES)), 3),
            "core_busy_share": {str(core): round(busy / wall, 3) for core, busy in sorted(per_core.items())},
        }
