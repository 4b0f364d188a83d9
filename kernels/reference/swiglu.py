"""Torch reference for the SwiGLU activation ``silu(gate) * up`` (computed in fp32, rounded once)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape ``(..., I)``, fp32 or bf16 -> ``silu(gate) * up`` in gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d gate, d up) in fp32, rounded once: ``dy up silu'(gate)`` and ``dy silu(gate)``,
    ``silu'(g) = s (1 + g (1 - s))``, ``s = sigmoid(g)``."""
    g, u, dy32 = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    return (dy32 * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy32 * g * s).to(up.dtype)
