"""The CPU code path a test runs on: what picks the CPU kernels, and so the last bits of float results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

MKL_SWITCHES = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")


def cpu_path() -> dict[str, str]:
    """ATen's vector ISA (ATEN_CPU_CAPABILITY lowers it), MKL's switches when set, and the processor model
    (MKL picks its kernels by vendor and model as well)."""
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {k: os.environ[k] for k in MKL_SWITCHES if k in os.environ}
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(), "cpu": model, **env}
