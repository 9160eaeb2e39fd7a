"""The machine under the figures: what it is, and whether something else was using its CPUs.

A benchmark on a shared 2-core box is only as good as its quietness, so besides describing the
machine we measure, per run, how much CPU went to processes that are not ours ("other CPU").
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NOISY_PCT = 10.0  # other processes' CPU, in % of one core, above which a run counts as noisy
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _first_line(argv: list[str], cwd: Path) -> str:
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def info(repo: Path) -> dict:
    """CPU model, core count, versions, date and commit: printed above every report."""
    import numpy
    import tornado

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_v = _first_line(["wrk", "-v"], repo)
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wrk": wrk_v.replace("wrk ", "").split(" [")[0],
        "tornado": tornado.version,
        "numpy": numpy.__version__,
        "git_commit": _first_line(["git", "rev-parse", "--short", "HEAD"], repo),
        "loadavg_start": os.getloadavg()[0],
    }


def busy_cpu_s() -> float:
    """CPU seconds spent in user+nice+system on all cores since boot (not irq/softirq/idle)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system = (int(x) for x in fields[1:4])
    except (OSError, ValueError, IndexError):
        return 0.0
    return (user + nice + system) / _TICK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (wrk runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class CpuMeter:
    """Other CPU = all busy CPU time minus ours (bench, wrk, our servers), as % of one core."""

    pids: list[int]
    t0: float = 0.0
    busy0: float = 0.0
    ours0: float = 0.0

    def _ours(self) -> float:
        return own_cpu_s() + sum(proc_cpu_s(p) for p in self.pids)

    def start(self) -> CpuMeter:
        self.t0, self.busy0, self.ours0 = time.monotonic(), busy_cpu_s(), self._ours()
        return self

    def other_pct(self) -> float:
        """Percent of one core used by processes that are not ours since start()."""
        wall = time.monotonic() - self.t0
        if wall <= 0:
            return 0.0
        other = (busy_cpu_s() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, other / wall * 100.0)


def wait_quiet(max_wait_s: float, threshold_pct: float = 10.0, window_s: float = 1.0) -> float:
    """Wait (up to `max_wait_s`) for a `window_s` during which others use < threshold of a core.

    Returns the last measured other-CPU percent, so the report can say how quiet it was.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        meter = CpuMeter(pids=[]).start()
        time.sleep(window_s)
        pct = meter.other_pct()
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct
