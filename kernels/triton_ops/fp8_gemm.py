"""Block-scaled FP8 GEMM ``C = A B^T`` (DeepSeek-V3): e4m3 operands, fp32 accumulation, scales applied
per 128-wide K tile (A: one scale per row and K tile; B: one per 128 x 128 block).

Per output tile: ``acc += dot(A[:, kt], B[:, kt]^T) * a_scale[:, kt] * b_scale[n // 128, kt]`` -- the partial
sum of every 128 products is promoted to the fp32 accumulator with its scales, as in DeepSeek's
``fp8_gemm_kernel``. On the GPU the tile product is a native FP8 tensor-core ``tl.dot`` (sm_89+);
the interpreter has none, so there the tiles are decoded exactly to fp32 first (``e4m3_value``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, interpreting
from .fp8_quant import e4m3_value


@triton.jit
def _fp8_gemm_kernel(A, AS, B, BS, C, M, N, KD, n_kt, NATIVE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < N
    a_ptr = A + rows.to(tl.int64)[:, None] * KD + ks[None, :]
    b_ptr = B + cols.to(tl.int64)[None, :] * KD + ks[:, None]  # (BLOCK_K, BLOCK_N) view of B^T
    b_scale_row = BS + ((pid_n * BLOCK_N) // 128) * n_kt
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(0, n_kt):
        kmask = kt * BLOCK_K + ks < KD
        a = tl.load(a_ptr, mask=rmask[:, None] & kmask[None, :], other=0)
        b = tl.load(b_ptr, mask=kmask[:, None] & cmask[None, :], other=0)
        if NATIVE:
            part = tl.dot(a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True))
        else:
            part = tl.dot(e4m3_value(a), e4m3_value(b), input_precision="ieee")
        a_s = tl.load(AS + rows * n_kt + kt, mask=rmask, other=0.0)
        b_s = tl.load(b_scale_row + kt)
        acc += part * a_s[:, None] * b_s
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    tl.store(C + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a ``(M, K)`` e4m3 + ``(M, ceil(K/128))`` fp32; b ``(N, K)`` e4m3 + ``(ceil(N/128), ceil(K/128))``
    fp32 -> ``(M, N)`` out_dtype."""
    assert a_fp8.dtype == b_fp8.dtype == torch.float8_e4m3fn, "a_fp8 and b_fp8 must be float8_e4m3fn"
    check_contiguous(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale)
    M, KD = a_fp8.shape
    N = b_fp8.shape[0]
    n_kt = triton.cdiv(KD, 128)
    assert a_scale.shape == (M, n_kt) and b_scale.shape == (triton.cdiv(N, 128), n_kt), "scale shapes"
    c = torch.full((M, N), float("nan"), dtype=out_dtype, device=a_fp8.device)
    native = not interpreting()
    BM, BN = (16, 32) if not native else (64, 128)
    if M and N:
        _fp8_gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            a_fp8.view(torch.uint8), a_scale, b_fp8.view(torch.uint8), b_scale, c, M, N, KD, n_kt,
            NATIVE=native, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=128,
        )
    return c
