"""RMSNorm (optionally fused with the residual add) in Triton.

Forward, per row: ``s = x (+ r)`` rounded to x.dtype, ``rstd = 1/sqrt(mean(s^2) + eps)``,
``n = round(s rstd)``, ``y = round(w n)`` (HF DeepseekV3RMSNorm's roundings; all math in fp32).
Backward (n recomputed from the saved s and rstd):
``dn = dy w``;  ``ds = rstd (dn - n mean(dn n)) + ds_out``  (ds_out: gradient of the residual output);
``dx = dr = ds``;  ``dw = sum_rows dy n`` (per-program partial sums, added up by torch: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, next_pow2


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, n_rows, D, eps,
                  HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(S + offs, s, mask=mask)
    else:
        s = x
    s32 = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=1) / D + eps)
    n = (s32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(Y + offs, (w[None, :] * n).to(x.dtype), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd(DY, DS_OUT, S, W, RSTD, DX, DW_PART, n_rows, D,
                  HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    n = s * rstd[:, None]
    dn = dy * w[None, :]
    ds = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    if HAS_DS:
        ds += tl.load(DS_OUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * D + cols, tl.sum(dy * n, axis=0), mask=cols < D)


def _block_rows(D: int) -> int:
    return max(1, min(16, 4096 // next_pow2(D)))


def rms_norm_fwd(x2d, weight, eps, res2d):
    """x2d ``(M, D)``, weight ``(D,)``, res2d ``(M, D)`` or None -> (y, s or None, rstd ``(M,)`` fp32)."""
    check_contiguous(x=x2d, weight=weight, **({"residual": res2d} if res2d is not None else {}))
    M, D = x2d.shape
    y = torch.full_like(x2d, float("nan"))
    s = torch.full_like(x2d, float("nan")) if res2d is not None else None
    rstd = torch.full((M,), float("nan"), dtype=torch.float32, device=x2d.device)
    BR = _block_rows(D)
    _rms_norm_fwd[(triton.cdiv(M, BR),)](
        x2d, res2d if res2d is not None else x2d, weight, y, s if s is not None else y, rstd, M, D, eps,
        HAS_RES=res2d is not None, BLOCK_R=BR, BLOCK_D=next_pow2(D),
    )
    return y, s, rstd


def rms_norm_bwd(dy, ds_out, s, weight, rstd):
    """-> (ds ``(M, D)`` in s.dtype, dw ``(D,)`` fp32)."""
    M, D = s.shape
    BR = _block_rows(D)
    grid = triton.cdiv(M, BR)
    dx = torch.full_like(s, float("nan"))
    dw_part = torch.full((grid, D), float("nan"), dtype=torch.float32, device=s.device)
    _rms_norm_bwd[(grid,)](
        dy, ds_out if ds_out is not None else dy, s, weight, rstd, dx, dw_part, M, D,
        HAS_DS=ds_out is not None, BLOCK_R=BR, BLOCK_D=next_pow2(D),
    )
    return dx, dw_part.sum(0)
