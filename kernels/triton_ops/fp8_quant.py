"""FP8 (e4m3) block quantisation and dequantisation kernels, DeepSeek-V3 layout, in Triton.

``scale = max(amax, 1e-4) / 448`` per 1 x 128 activation tile or 128 x 128 weight block, ``q = e4m3(x / scale)``
with IEEE division (``div_rn``) and round-to-nearest-even. The e4m3 bits are produced (and read) by the
integer/float helpers below rather than by a dtype cast: they are exact on every backend, so the
interpreter reproduces the torch reference bit for bit, and the same code ships to the GPU (the kernels
are memory-bound, the extra ALU work is free). FP8 tensors travel as ``torch.float8_e4m3fn`` viewed as
uint8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.fp8 import AMAX_FLOOR, BLOCK, FP8_MAX, is_weight_scale
from ._common import check_contiguous, tl_dtype_ok


@triton.jit
def e4m3_bits(y):
    """fp32 -> e4m3fn bit pattern (int32 0..255), round to nearest even, saturating at 448."""
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 128
    a = tl.minimum(tl.abs(y), 448.0)
    # subnormals (a < 2^-6): multiples of 2^-9; round a * 2^9 to the nearest even integer (exact float ops)
    v = a * 512.0
    k = tl.floor(v)
    d = v - k
    up = (d > 0.5) | ((d == 0.5) & ((k.to(tl.int32) & 1) == 1))
    sub = k.to(tl.int32) + up.to(tl.int32)  # 8 encodes 2^-6, the smallest normal: same bits
    # normals: keep 3 mantissa bits of the fp32 pattern, round to nearest even (carry reaches the exponent)
    b = a.to(tl.int32, bitcast=True)
    low = b & 0xFFFFF
    base = b >> 20
    base += ((low > 0x80000) | ((low == 0x80000) & ((base & 1) == 1))).to(tl.int32)
    norm = base - (120 << 3)  # fp32 exponent bias 127 -> e4m3 bias 7
    bits = tl.minimum(tl.where(a < 0.015625, sub, norm), 126)  # 126 = 0x7E = 448
    return bits | sign


@triton.jit
def e4m3_value(bits):
    """e4m3fn bit pattern (any int type) -> exact fp32 value (NaN patterns are never produced here)."""
    b = bits.to(tl.int32) & 255
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def _quant_act_kernel(X, Q, S, M, KD, n_kt, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kt = tl.program_id(1)
    cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < KD)[None, :]
    offs = rows.to(tl.int64)[:, None] * KD + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0)
    q = e4m3_bits(tl.math.div_rn(x, scale[:, None]))
    tl.store(Q + offs, q.to(tl.uint8), mask=mask)
    tl.store(S + rows * n_kt + kt, scale, mask=rows < M)


@triton.jit
def _quant_weight_kernel(W, Q, S, N, KD, n_kt, BLOCK: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    rows = nb * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < KD)[None, :]
    offs = rows.to(tl.int64)[:, None] * KD + cols[None, :]
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-4), 448.0)
    tl.store(Q + offs, e4m3_bits(tl.math.div_rn(w, scale)).to(tl.uint8), mask=mask)
    tl.store(S + nb * n_kt + kb, scale)


@triton.jit
def _dequant_kernel(Q, S, OUT, M, KD, n_kt, ROWS_PER_SCALE, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < KD)[None, :]
    offs = rows.to(tl.int64)[:, None] * KD + cols[None, :]
    q = tl.load(Q + offs, mask=mask, other=0)
    s = tl.load(S + (rows // ROWS_PER_SCALE)[:, None] * n_kt + (cols // 128)[None, :], mask=mask, other=0.0)
    tl.store(OUT + offs, (e4m3_value(q) * s).to(OUT.dtype.element_ty), mask=mask)


def _new_fp8(shape, device) -> torch.Tensor:
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    q.view(torch.uint8).fill_(0x7F)  # poison: e4m3fn NaN
    return q


def fp8_quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(..., K)`` fp32/bf16 -> (float8_e4m3fn ``(..., K)``, fp32 scales ``(..., ceil(K/128))``)."""
    tl_dtype_ok(x, "x")
    KD = x.shape[-1]
    x2d = x.reshape(-1, KD).contiguous()
    M = x2d.shape[0]
    n_kt = triton.cdiv(KD, BLOCK)
    q = _new_fp8((M, KD), x.device)
    s = torch.full((M, n_kt), float("nan"), dtype=torch.float32, device=x.device)
    BR = 16
    if M:
        _quant_act_kernel[(triton.cdiv(M, BR), n_kt)](
            x2d, q.view(torch.uint8), s, M, KD, n_kt, BLOCK_R=BR, BLOCK_K=BLOCK
        )
    return q.view(x.shape), s.view(*x.shape[:-1], n_kt)


def fp8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w ``(N, K)`` fp32/bf16 -> (float8_e4m3fn ``(N, K)``, fp32 scale_inv ``(ceil(N/128), ceil(K/128))``)."""
    tl_dtype_ok(w, "w")
    assert w.dim() == 2, f"w must be (N, K), got {tuple(w.shape)}"
    w = w.contiguous()
    N, KD = w.shape
    nb, n_kt = triton.cdiv(N, BLOCK), triton.cdiv(KD, BLOCK)
    q = _new_fp8((N, KD), w.device)
    s = torch.full((nb, n_kt), float("nan"), dtype=torch.float32, device=w.device)
    if N and KD:
        _quant_weight_kernel[(nb, n_kt)](w, q.view(torch.uint8), s, N, KD, n_kt, BLOCK=BLOCK)
    return q, s


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn ``(..., K)`` with 1x128-tile scales, or ``(N, K)`` with 128x128-block scales -> dtype."""
    assert x_fp8.dtype == torch.float8_e4m3fn, f"x_fp8 must be float8_e4m3fn, got {x_fp8.dtype}"
    check_contiguous(x_fp8=x_fp8, scale=scale)
    weight_blocks = is_weight_scale(x_fp8.shape, scale)
    KD = x_fp8.shape[-1]
    q2d = x_fp8.reshape(-1, KD)
    M = q2d.shape[0]
    out = torch.full((M, KD), float("nan"), dtype=dtype, device=x_fp8.device)
    BR = 16
    if M and KD:
        _dequant_kernel[(triton.cdiv(M, BR), triton.cdiv(KD, BLOCK))](
            q2d.view(torch.uint8), scale, out, M, KD, triton.cdiv(KD, BLOCK), BLOCK if weight_blocks else 1,
            BLOCK_R=BR, BLOCK_K=BLOCK,
        )
    return out.view(x_fp8.shape)


assert FP8_MAX == 448.0 and AMAX_FLOOR == 1e-4 and BLOCK == 128  # the kernels hard-code these constants
