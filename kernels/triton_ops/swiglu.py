"""SwiGLU activation ``silu(gate) * up`` in Triton (elementwise, fp32 math, one rounding).

Backward (sigmoid recomputed): with ``sg = sigmoid(g)``, ``silu(g) = g sg``,
``dg = dy u sg (1 + g (1 - sg))``,  ``du = dy silu(g)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    tl.store(DG + offs, (dy * u * sg * (1.0 + g * (1.0 - sg))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, same shape/dtype -> silu(gate) * up."""
    check_contiguous(gate=gate, up=up)
    y = torch.full_like(gate, float("nan"))
    n = gate.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


def swiglu_bwd(dy, gate, up):
    check_contiguous(dy=dy, gate=gate, up=up)
    dg = torch.full_like(gate, float("nan"))
    du = torch.full_like(up, float("nan"))
    n = gate.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du
