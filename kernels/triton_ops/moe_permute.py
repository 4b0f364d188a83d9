"""MoE token permutation (group tokens by expert) in Triton.

Forward, a gather per permuted row r of the ``T*K`` expert-sorted rows: ``x_perm[r] = x[row_slot[r] // K]``
(no pad rows). Backward, a gather-sum per token in slot order (deterministic, no atomics):
``dx[t] = sum_k dx_perm[rows[t, k]]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, next_pow2


@triton.jit
def _permute_fwd(X, ROW_SLOT, XP, n_rows, D, K, n_slots, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    slot = tl.load(ROW_SLOT + rows, mask=rmask, other=n_slots)
    real = slot < n_slots
    tok = tl.where(real, slot // K, 0).to(tl.int64)
    cmask = cols < D
    x = tl.load(X + tok[:, None] * D + cols[None, :], mask=(real[:, None] & cmask[None, :]), other=0.0)
    tl.store(XP + rows.to(tl.int64)[:, None] * D + cols[None, :], x, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _permute_bwd(DXP, ROWS, DX, T, D, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    mask = tmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in range(K):
        r = tl.load(ROWS + toks * K + k, mask=tmask, other=0).to(tl.int64)
        acc += tl.load(DXP + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + toks.to(tl.int64)[:, None] * D + cols[None, :], acc.to(DX.dtype.element_ty), mask=mask)


def _blocks(D: int) -> tuple[int, int]:
    BD = min(next_pow2(D), 256)
    return max(1, 2048 // BD), BD


def permute_fwd(x: torch.Tensor, row_slot: torch.Tensor, K: int) -> torch.Tensor:
    """x ``(T, D)`` contiguous, row_slot ``(R,)`` int64 -> x_perm ``(R, D)``."""
    check_contiguous(x=x, row_slot=row_slot)
    T, D = x.shape
    R = row_slot.numel()
    xp = torch.full((R, D), float("nan"), dtype=x.dtype, device=x.device)
    BR, BD = _blocks(D)
    if R:
        _permute_fwd[(triton.cdiv(R, BR), triton.cdiv(D, BD))](x, row_slot, xp, R, D, K, T * K, BLOCK_R=BR, BLOCK_D=BD)
    return xp


def permute_bwd(dxp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dx_perm ``(R, D)``, rows ``(T, K)`` int64 -> dx ``(T, D)``."""
    check_contiguous(dx_perm=dxp, rows=rows)
    T, K = rows.shape
    D = dxp.shape[1]
    dx = torch.full((T, D), float("nan"), dtype=dxp.dtype, device=dxp.device)
    BT, BD = _blocks(D)
    if T:
        _permute_bwd[(triton.cdiv(T, BT), triton.cdiv(D, BD))](dxp, rows, dx, T, D, K=K, BLOCK_T=BT, BLOCK_D=BD)
    return dx
