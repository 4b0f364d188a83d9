"""MoE weighted un-permute / combine in Triton (deterministic: no atomics, slot-order fp32 sums).

Forward, per token: ``out[t] = sum_k w[t, k] y[rows[t, k]]``.
Backward: ``dy[r] = w[slot] dout[slot // K]`` for the slot held by row r -- a gather;
``dw[t, k] = <dout[t], y[rows[t, k]]>`` -- a row-wise dot product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, next_pow2


@triton.jit
def _combine_fwd(Y, ROWS, W, OUT, T, D, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    mask = tmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in range(K):
        r = tl.load(ROWS + toks * K + k, mask=tmask, other=0).to(tl.int64)
        w = tl.load(W + toks * K + k, mask=tmask, other=0.0).to(tl.float32)
        y = tl.load(Y + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    tl.store(OUT + toks.to(tl.int64)[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_dy(DOUT, ROW_SLOT, W, DY, n_rows, D, K, n_slots, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    slot = tl.load(ROW_SLOT + rows, mask=rmask, other=n_slots)
    real = slot < n_slots
    safe = tl.where(real, slot, 0)
    w = tl.load(W + safe, mask=real, other=0.0).to(tl.float32)
    tok = (safe // K).to(tl.int64)
    dout = tl.load(DOUT + tok[:, None] * D + cols[None, :], mask=real[:, None] & cmask[None, :], other=0.0)
    dy = w[:, None] * dout.to(tl.float32)
    tl.store(DY + rows.to(tl.int64)[:, None] * D + cols[None, :], dy.to(DY.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_bwd_dw(DOUT, Y, ROWS, DW, n_slots, D, K, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = slots < n_slots
    r = tl.load(ROWS + slots, mask=smask, other=0).to(tl.int64)
    tok = (slots // K).to(tl.int64)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = smask[:, None] & (cols < D)[None, :]
        dout = tl.load(DOUT + tok[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + r[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dout * y, axis=1)
    tl.store(DW + slots, acc.to(DW.dtype.element_ty), mask=smask)


def _blocks(D: int) -> tuple[int, int]:
    BD = min(next_pow2(D), 256)
    return max(1, 2048 // BD), BD


def combine_fwd(y, rows, w):
    """y ``(R, D)``, rows ``(T, K)`` int64, w ``(T, K)`` -> out ``(T, D)`` in y.dtype."""
    check_contiguous(y_perm=y, rows=rows, topk_weight=w)
    T, K = rows.shape
    D = y.shape[1]
    out = torch.full((T, D), float("nan"), dtype=y.dtype, device=y.device)
    BT, BD = _blocks(D)
    if T:
        _combine_fwd[(triton.cdiv(T, BT), triton.cdiv(D, BD))](y, rows, w, out, T, D, K=K, BLOCK_T=BT, BLOCK_D=BD)
    return out


def combine_bwd(dout, y, rows, row_slot, w, need_dy, need_dw):
    check_contiguous(dout=dout)
    T, K = rows.shape
    R, D = y.shape
    dy = dw = None
    BR, BD = _blocks(D)
    if need_dy:
        dy = torch.full((R, D), float("nan"), dtype=y.dtype, device=y.device)
        if R:
            _combine_bwd_dy[(triton.cdiv(R, BR), triton.cdiv(D, BD))](
                dout, row_slot, w, dy, R, D, K, T * K, BLOCK_R=BR, BLOCK_D=BD)
    if need_dw:
        dw = torch.full((T, K), float("nan"), dtype=w.dtype, device=w.device)
        if T:
            BS = 64
            _combine_bwd_dw[(triton.cdiv(T * K, BS),)](dout, y, rows, dw, T * K, D, K, BLOCK_S=BS,
                                                       BLOCK_D=min(next_pow2(D), 128))
    return dy, dw
