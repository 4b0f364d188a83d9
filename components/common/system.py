"""Facts about the host a stage runs on, and how long its work will take."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows). MKL and ATen pick
    their kernels by it, so results and timings name it."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def duration(seconds: float) -> str:
    """`1h02m` or `3m07s`."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def eta(done: int, total: int, elapsed_s: float) -> str:
    """The time the remaining `total - done` units will take at the pace of the `done` ones so far."""
    return duration(elapsed_s / done * (total - done)) if done > 0 else "?"
