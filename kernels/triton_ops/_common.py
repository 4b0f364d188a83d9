"""Small helpers shared by the Triton op modules."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (no bf16 ``tl.dot`` there)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        assert t.is_contiguous(), f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}"


def tl_dtype_ok(t: torch.Tensor, name: str) -> None:
    assert t.dtype in (torch.float32, torch.bfloat16), f"{name} must be fp32 or bf16, got {t.dtype}"
