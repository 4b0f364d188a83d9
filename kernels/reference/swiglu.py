"""Torch reference for the SwiGLU activation ``silu(gate) * up`` (computed in fp32, rounded once)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape ``(..., I)``, fp32 or bf16 -> ``silu(gate) * up`` in gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
