"""The CPU code path a test runs on: what picks the CPU kernels, and so the last bits of float results."""

from __future__ import annotations

import os

import torch

from components.common.system import cpu_model

MKL_SWITCHES = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")


def cpu_path() -> dict[str, str]:
    """ATen's vector ISA (ATEN_CPU_CAPABILITY lowers it), MKL's switches when set, and the processor model
    (MKL picks its kernels by vendor and model as well)."""
    env = {k: os.environ[k] for k in MKL_SWITCHES if k in os.environ}
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_model(), **env}
