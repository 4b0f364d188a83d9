"""Grouped GEMM over expert segments (MoE experts' linear layers) in Triton.

The permuted rows come in blocks of ``routing.block`` rows, each block owned by one expert
(``routing.block_expert``), so every ``BLOCK_M`` row tile belongs to exactly one expert (the layout of
vLLM's fused MoE). One launch covers all experts -- no Python loop over experts.

Forward ``y = x W_e^T`` and input gradient ``dx = dy W_e`` are the same kernel
``C[m, :] = A[m, :] B_e`` with B_e read through strides (``W_e^T`` or ``W_e``). The weight gradient
``dW_e = sum_{rows r of e} dy[r]^T x[r]`` is a second kernel: one program per (expert, output tile)
walking that expert's rows in order (deterministic, no atomics); pad rows are masked out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.moe import MoeRouting
from ._common import check_contiguous, interpreting, tl_dtype_ok


@triton.jit
def _grouped_mm_kernel(A, B, C, BLOCK_EXPERT, N, KD, block, stride_be, stride_bk, stride_bn,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[rows, n] = A[rows, :] @ B[e, :, n] for the expert e owning this row tile
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + (pid_m * BLOCK_M) // block).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    b_base = B + e * stride_be
    for k0 in range(0, KD, BLOCK_K):
        kk = k0 + ks
        a = tl.load(A + rows[:, None] * KD + kk[None, :], mask=(kk < KD)[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(kk < KD)[:, None] & (cols < N)[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty), mask=(cols < N)[None, :])


@triton.jit
def _grouped_dw_kernel(DY, X, DW, EXPERT_BLOCK_START, ROW_SLOT, n_slots, NO, KI, block,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # DW[e, n, k] = sum over rows r of expert e of DY[r, n] X[r, k]
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    r0 = (tl.load(EXPERT_BLOCK_START + e) * block).to(tl.int32)
    r1 = (tl.load(EXPERT_BLOCK_START + e + 1) * block).to(tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for start in range(r0, r1, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        real = tl.load(ROW_SLOT + rows) < n_slots
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


def routing_block() -> int:
    """Rows per routing block the Triton MoE path asks ``moe_routing`` for."""
    return 16 if interpreting() else 64


def _tiles(block: int) -> tuple[int, int, int]:
    assert block % 16 == 0, (
        f"the Triton grouped GEMM needs routing blocks of a multiple of 16 rows, got {block}; "
        f"build the routing with moe_routing(topk_idx, E, block={routing_block()})"
    )
    if interpreting():
        return 16, 32, 32
    bm = 64 if block % 64 == 0 else (32 if block % 32 == 0 else 16)
    return bm, 64, 64


def grouped_mm(a: torch.Tensor, w: torch.Tensor, block_expert: torch.Tensor, block: int, transpose_w: bool):
    """a ``(R, Kd)``; w ``(E, N, Kd)`` if transpose_w (computes ``a W_e^T``) else ``(E, Kd, N)`` (``a W_e``)."""
    check_contiguous(a=a, w=w, block_expert=block_expert)
    R, KD = a.shape
    E, d1, d2 = w.shape
    N = d1 if transpose_w else d2
    assert (d2 if transpose_w else d1) == KD, f"inner dims differ: a {tuple(a.shape)}, w {tuple(w.shape)}"
    BM, BN, BK = _tiles(block)
    c = torch.full((R, N), float("nan"), dtype=a.dtype, device=a.device)
    if transpose_w:  # B[e, k, n] = w[e, n, k]
        sbe, sbk, sbn = w.stride(0), w.stride(2), w.stride(1)
    else:
        sbe, sbk, sbn = w.stride(0), w.stride(1), w.stride(2)
    if R:
        _grouped_mm_kernel[(R // BM, triton.cdiv(N, BN))](
            a, w, c, block_expert, N, KD, block, sbe, sbk, sbn,
            UPCAST=interpreting(), PRECISION=_precision(a), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        )
    return c


def grouped_dw(dy, x, row_slot, n_slots, block_expert, block, num_experts, dtype):
    """-> dW ``(E, Dout, Din)``: dy ``(R, Dout)``, x ``(R, Din)``."""
    check_contiguous(dy=dy, x=x)
    R, NO = dy.shape
    KI = x.shape[1]
    BM, BN, BK = _tiles(block)
    seg_blocks = torch.bincount(block_expert, minlength=num_experts)
    start = torch.cat([seg_blocks.new_zeros(1), torch.cumsum(seg_blocks, 0)])
    dw = torch.full((num_experts, NO, KI), float("nan"), dtype=dtype, device=dy.device)
    _grouped_dw_kernel[(num_experts, triton.cdiv(NO, BN), triton.cdiv(KI, BK))](
        dy, x, dw, start, row_slot, n_slots, NO, KI, block,
        UPCAST=interpreting(), PRECISION=_precision(dy), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )
    return dw


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, block_expert, row_slot, block, n_slots):
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, block_expert, row_slot)
        ctx.block, ctx.n_slots = block, n_slots
        return grouped_mm(x, w, block_expert, block, transpose_w=True)

    @staticmethod
    def backward(ctx, dy):
        x, w, block_expert, row_slot = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm(dy, w, block_expert, ctx.block, transpose_w=False)  # dx = dy W_e
        if ctx.needs_input_grad[1]:
            dw = grouped_dw(dy, x, row_slot, ctx.n_slots, block_expert, ctx.block, w.shape[0], w.dtype)
        return dx, dw, None, None, None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """x ``(R, Din)`` fp32/bf16 permuted rows; w ``(E, Dout, Din)`` -> ``(R, Dout)``, ``x W_e^T`` per segment."""
    tl_dtype_ok(x, "x")
    assert x.shape[0] == routing.num_rows, f"x has {x.shape[0]} rows, routing has {routing.num_rows}"
    assert w.dtype == x.dtype, f"w and x dtypes differ: {w.dtype} vs {x.dtype}"
    return GroupedGemmFunction.apply(
        x, w, routing.block_expert.contiguous(), routing.row_slot.contiguous(), routing.block, routing.rows.numel()
    )
