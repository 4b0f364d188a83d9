"""Rotary embedding on adjacent pairs (DeepSeek's interleaved layout) in Triton.

Forward, pair i of position t: ``o0 = x0 c - x1 s``, ``o1 = x1 c + x0 s`` (c, s = cos, sin[t, i]).
Backward is the inverse rotation (the transpose of an orthogonal matrix):
``dx0 = do0 c + do1 s``, ``dx1 = do1 c - do0 s`` -- the same kernel with sin negated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_rows, T, HALF, SIGN: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    # rows are the (leading..., t) positions of x viewed as (n_rows, 2 * HALF)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (i < HALF)[None, :]
    t = rows % T
    cs_off = t[:, None] * HALF + i[None, :]
    c = tl.load(COS + cs_off, mask=mask, other=0.0)
    s = tl.load(SIN + cs_off, mask=mask, other=0.0) * SIGN
    base = rows.to(tl.int64)[:, None] * (2 * HALF) + 2 * i[None, :]
    x0 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + base + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + base, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + base + 1, (x1 * c + x0 * s).to(Y.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x ``(..., T, D)`` contiguous, cos/sin ``(T, D // 2)`` fp32 -> x rotated by ``sign`` times the angles."""
    check_contiguous(x=x, cos=cos, sin=sin)
    T, D = x.shape[-2], x.shape[-1]
    y = torch.full_like(x, float("nan"))
    n_rows = x.numel() // D
    half = D // 2
    BH = next_pow2(half)
    BR = max(1, min(64, 2048 // BH))
    _rope_kernel[(triton.cdiv(n_rows, BR),)](x, cos, sin, y, n_rows, T, half, SIGN=sign, BLOCK_R=BR, BLOCK_H=BH)
    return y
