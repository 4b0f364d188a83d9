"""Grouped GEMM over expert segments (MoE experts' linear layers) in Triton, over exactly the routed rows.

The permuted rows are sorted by expert with no padding: expert e owns rows ``offsets[e]:offsets[e+1]``.
The host cuts every segment into ``BLOCK_M``-row tiles (``tile_schedule``: the expert and first row of each
tile, ``sum_e ceil(count_e / BLOCK_M)`` tiles); a tile's rows past its segment's end are masked, so no
row is padded and no weight is copied. One launch covers all experts -- no Python loop over experts.

Forward ``y = x W_e^T`` and input gradient ``dx = dy W_e`` are the same kernel
``C[m, :] = A[m, :] B_e`` with B_e read through strides (``W_e^T`` or ``W_e``). The weight gradient
``dW_e = sum_{rows r of e} dy[r]^T x[r]`` is a second kernel: one program per (expert, output tile)
walking that expert's rows in order (deterministic, no atomics); an idle expert's tile is written zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, interpreting


@triton.jit
def _grouped_mm_kernel(A, B, C, TILE_EXPERT, TILE_ROW, OFFSETS, N, KD, stride_be, stride_bk, stride_bn,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[rows, n] = A[rows, :] @ B[e, :, n] for the expert e owning this row tile
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TILE_EXPERT + pid_m)
    r0 = tl.load(TILE_ROW + pid_m)
    r_end = tl.load(OFFSETS + e + 1)
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < r_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    b_base = B + e * stride_be
    for k0 in range(0, KD, BLOCK_K):
        kk = k0 + ks
        a = tl.load(A + rows[:, None] * KD + kk[None, :], mask=rmask[:, None] & (kk < KD)[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(kk < KD)[:, None] & (cols < N)[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
             mask=rmask[:, None] & (cols < N)[None, :])


@triton.jit
def _grouped_dw_kernel(DY, X, DW, OFFSETS, NO, KI,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # DW[e, n, k] = sum over rows r of expert e of DY[r, n] X[r, k]
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    r0 = tl.load(OFFSETS + e).to(tl.int32)
    r1 = tl.load(OFFSETS + e + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for start in range(r0, r1, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        real = rows < r1
        dy = tl.load(DY + rows[:, None] * NO + ns[None, :], mask=real[:, None] & (ns < NO)[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * KI + ks[None, :], mask=real[:, None] & (ks < KI)[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    out = DW + e.to(tl.int64) * NO * KI + ns[:, None] * KI + ks[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=(ns < NO)[:, None] & (ks < KI)[None, :])


def _precision(t: torch.Tensor) -> str:
    # fp32 operands: exact fp32 products ("ieee"), not TF32, so fp32 results match the reference to 1e-5
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _tiles() -> tuple[int, int, int]:
    return (16, 32, 32) if interpreting() else (64, 64, 64)


def tile_schedule(offsets: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of every ``block_m``-row tile of every non-empty segment, in row order."""
    counts = offsets.diff()
    tiles = (counts + block_m - 1) // block_m
    tile_expert = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    within = torch.arange(tile_expert.numel(), device=offsets.device) - first_tile[tile_expert]
    return tile_expert, offsets[tile_expert] + within * block_m


def grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """a ``(R, Kd)``; w ``(E, N, Kd)`` if transpose_w (computes ``a W_e^T``) else ``(E, Kd, N)`` (``a W_e``)."""
    check_contiguous(a=a, w=w, offsets=offsets)
    R, KD = a.shape
    E, d1, d2 = w.shape
    N = d1 if transpose_w else d2
    assert (d2 if transpose_w else d1) == KD, f"inner dims differ: a {tuple(a.shape)}, w {tuple(w.shape)}"
    BM, BN, BK = _tiles()
    c = torch.full((R, N), float("nan"), dtype=a.dtype, device=a.device)
    if transpose_w:  # B[e, k, n] = w[e, n, k]
        sbe, sbk, sbn = w.stride(0), w.stride(2), w.stride(1)
    else:
        sbe, sbk, sbn = w.stride(0), w.stride(1), w.stride(2)
    tile_expert, tile_row = tile_schedule(offsets, BM)
    if tile_expert.numel():
        _grouped_mm_kernel[(tile_expert.numel(), triton.cdiv(N, BN))](
            a, w, c, tile_expert, tile_row, offsets, N, KD, sbe, sbk, sbn,
            UPCAST=interpreting(), PRECISION=_precision(a), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        )
    return c


def grouped_dw(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-> dW ``(E, Dout, Din)``: dy ``(R, Dout)``, x ``(R, Din)``; zero for an idle expert."""
    check_contiguous(dy=dy, x=x, offsets=offsets)
    NO, KI = dy.shape[1], x.shape[1]
    E = offsets.numel() - 1
    BM, BN, BK = _tiles()
    dw = torch.full((E, NO, KI), float("nan"), dtype=dtype, device=dy.device)
    _grouped_dw_kernel[(E, triton.cdiv(NO, BN), triton.cdiv(KI, BK))](
        dy, x, dw, offsets, NO, KI,
        UPCAST=interpreting(), PRECISION=_precision(dy), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )
    return dw
