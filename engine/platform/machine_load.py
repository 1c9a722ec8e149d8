"""How busy this machine is right now: load average, CPUs kept busy by other processes, the busiest of them.

Read from /proc (Linux); elsewhere every figure is None. The engine sizes its CPU threads from it (cpu_threads.py)
and `hayabusa bench` records it beside every run and warns before timing on a busy machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROC = Path("/proc")
SAMPLE_S = 0.1  # long enough to see the scheduler's 4 ms ticks, short enough for an engine start
MAX_LISTED_PROCESSES = 5


@dataclass(frozen=True)
class MachineLoad:
    cpus: int  # logical CPUs this process may run on
    loadavg_1m: float | None  # /proc/loadavg: runnable + uninterruptible tasks, 1-minute average
    other_busy_cpus: float | None  # CPUs kept busy by other processes over the sample (0 .. cpus)
    busiest_processes: list[dict]  # [{pid, cpu_pct, command}] of other processes, busiest first

    @property
    def others_busy(self) -> bool:
        """Other processes held at least half the CPUs over the sample (this process's own work never counts)."""
        return self.other_busy_cpus is not None and self.other_busy_cpus >= 0.5 * self.cpus

    @property
    def busy(self) -> bool:
        """Other processes hold at least half the CPUs (now, or on average over the last minute: the load average
        counts this process too, so it only speaks for others before this process gets to work)."""
        recently = self.loadavg_1m is not None and self.loadavg_1m > 0.5 * self.cpus
        return self.others_busy or recently

    def as_dict(self) -> dict:
        return {**asdict(self), "others_busy": self.others_busy, "busy": self.busy}


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_machine_load(sample_s: float = SAMPLE_S) -> MachineLoad:
    """Sample /proc/stat, /proc/self/stat and every process's CPU time over `sample_s`."""
    cpus = usable_cpus()
    before = _snapshot()
    if before is None:
        return MachineLoad(cpus, _loadavg(), None, [])
    time.sleep(sample_s)
    after = _snapshot()
    busy_all = (after.busy_ticks - before.busy_ticks) / max(after.total_ticks - before.total_ticks, 1)
    online = os.cpu_count() or cpus  # /proc/stat's first line sums every online CPU
    own = (after.own_ticks - before.own_ticks) / (os.sysconf("SC_CLK_TCK") * sample_s)
    other = min(max(busy_all * online - own, 0.0), float(cpus))
    return MachineLoad(cpus, _loadavg(), round(other, 2), _busiest(before.per_process, after.per_process, sample_s))


@dataclass
class _Snapshot:
    busy_ticks: int
    total_ticks: int
    own_ticks: int
    per_process: dict[int, tuple[int, str]]  # pid -> (utime + stime ticks, command)


def _snapshot() -> _Snapshot | None:
    try:
        fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
        own = _process_ticks(PROC / "self")
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    processes = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                processes[int(entry.name)] = (_process_ticks(entry), _command(entry))
            except (OSError, ValueError):  # the process ended while we read it
                continue
    return _Snapshot(total - idle, total, own, processes)


def _process_ticks(proc_dir: Path) -> int:
    # /proc/<pid>/stat: the command may hold spaces, so fields are counted after its closing parenthesis.
    after_command = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    return int(after_command[11]) + int(after_command[12])  # utime, stime


def _command(proc_dir: Path) -> str:
    raw = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").strip()
    return raw.decode(errors="replace")[:120] or (proc_dir / "comm").read_text().strip()


def _busiest(before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]], sample_s: float) -> list[dict]:
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    used = [(after[pid][0] - ticks, pid, after[pid][1]) for pid, (ticks, _) in before.items() if pid in after]
    used = sorted((u for u in used if u[0] > 0), reverse=True)[:MAX_LISTED_PROCESSES]
    return [{"pid": pid, "cpu_pct": round(100 * ticks / ticks_per_s / sample_s), "command": command}
            for ticks, pid, command in used]


def _loadavg() -> float | None:
    try:
        return float((PROC / "loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
