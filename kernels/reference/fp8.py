"""Torch reference for DeepSeek-V3's block-scaled FP8 (e4m3) quantisation and GEMM.

- activations: one scale per 1 x 128 tile along the last dim; weights: one per 128 x 128 block
  (ragged edges get a partial tile/block); ``scale = max(amax, 1e-4) / 448`` is the *dequantisation*
  multiplier (checkpoints call the weights' one ``weight_scale_inv``), and ``q = e4m3(x / scale)``
  rounded to nearest even -- the same IEEE fp32 division and rounding the Triton kernels perform, so on
  CPU the kernels must reproduce these bits exactly.
- GEMM ``C = A B^T``: for every 128-wide K tile the e4m3 products are summed in fp32 and the partial sum is
  multiplied by its two scales and added to an fp32 accumulator ("promotion every 128 elements of K").
  Only the order of additions inside a tile may differ from the kernel.
- ``fp8_linear`` (differentiable): forward quantises x and W on the fly and runs the block-scaled GEMM;
  the backward multiplies the incoming gradient by the *dequantised* FP8 operands in x.dtype
  (straight-through estimator: the quantisation is treated as identity; only FP8 tensors are saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
FP8_DTYPE = torch.float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last(x: torch.Tensor, mult: int) -> torch.Tensor:
    pad = _cdiv(x.shape[-1], mult) * mult - x.shape[-1]
    return F.pad(x, (0, pad)) if pad else x


def fp8_quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(..., K)`` fp32/bf16 -> (x_fp8 ``(..., K)`` float8_e4m3fn, scales ``(..., ceil(K/128))`` fp32)."""
    K = x.shape[-1]
    xt = _pad_last(x.float(), BLOCK).unflatten(-1, (-1, BLOCK))
    scale = xt.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (xt / scale.unsqueeze(-1)).to(FP8_DTYPE).flatten(-2)[..., :K]
    return q.contiguous(), scale


def fp8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w ``(N, K)`` fp32/bf16 -> (w_fp8 ``(N, K)`` float8_e4m3fn, scale_inv ``(ceil(N/128), ceil(K/128))`` fp32)."""
    assert w.dim() == 2, f"weight must be 2-D (N, K), got {tuple(w.shape)}"
    N, K = w.shape
    wp = _pad_last(_pad_last(w.float(), BLOCK).T, BLOCK).T  # (Np, Kp)
    blocks = wp.unflatten(0, (-1, BLOCK)).unflatten(-1, (-1, BLOCK))  # (Nb, 128, Kb, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).to(FP8_DTYPE).flatten(2).flatten(0, 1)[:N, :K]
    return q.contiguous(), scale


def expand_scale(scale: torch.Tensor, shape: torch.Size, weight_blocks: bool) -> torch.Tensor:
    """Scale per element of a tensor of ``shape``: 1 x 128 tiles (activations) or 128 x 128 blocks."""
    s = scale.repeat_interleave(BLOCK, dim=-1)[..., : shape[-1]]
    if weight_blocks:
        s = s.repeat_interleave(BLOCK, dim=0)[: shape[0]]
    return s


def is_weight_scale(x_shape: torch.Size, scale: torch.Tensor) -> bool:
    """Which layout ``scale`` has for a tensor of ``x_shape`` (both agree when they coincide)."""
    act = tuple(x_shape[:-1]) + (_cdiv(x_shape[-1], BLOCK),)
    if tuple(scale.shape) == act:
        return False
    if len(x_shape) == 2 and tuple(scale.shape) == (_cdiv(x_shape[0], BLOCK), _cdiv(x_shape[1], BLOCK)):
        return True
    raise AssertionError(
        f"scale {tuple(scale.shape)} fits neither 1x128 tiles {act} nor 128x128 blocks of {tuple(x_shape)}"
    )


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_fp8 (float8_e4m3fn) times its scales -> ``dtype``; the layout (1x128 tiles or 128x128 blocks)
    is read from the scale's shape."""
    s = expand_scale(scale, x_fp8.shape, is_weight_scale(x_fp8.shape, scale))
    return (x_fp8.float() * s).to(dtype)


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``C = A B^T`` with block scales. a ``(M, K)`` e4m3 + ``(M, ceil(K/128))``; b ``(N, K)`` e4m3 +
    ``(ceil(N/128), ceil(K/128))``; -> ``(M, N)`` out_dtype, fp32 accumulation promoted per 128 of K."""
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32, device=a_fp8.device)
    b_row_scale = b_scale.repeat_interleave(BLOCK, dim=0)[:N]  # (N, Kt)
    for kt in range(_cdiv(K, BLOCK)):
        k0, k1 = kt * BLOCK, min(K, (kt + 1) * BLOCK)
        part = a_fp8[:, k0:k1].float() @ b_fp8[:, k0:k1].float().T
        acc += part * a_scale[:, kt : kt + 1] * b_row_scale[:, kt][None, :]
    return acc.to(out_dtype)


class FP8Linear(torch.autograd.Function):
    """``y = x W^T`` through block-scaled FP8; backward with the dequantised operands (see module doc).

    ``ops`` = (quantize_act, quantize_weight, gemm, dequantize): the torch reference or the Triton kernels.
    """

    @staticmethod
    def forward(ctx, x2d, weight, ops):
        quant_act, quant_weight, gemm, _ = ops
        xq, xs = quant_act(x2d)
        wq, ws = quant_weight(weight)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, x2d.dtype, weight.dtype
        return gemm(xq, xs, wq, ws, x2d.dtype)

    @staticmethod
    def backward(ctx, g):
        xq, xs, wq, ws = ctx.saved_tensors
        dequant = ctx.ops[3]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = g.to(ctx.x_dtype) @ dequant(wq, ws, ctx.x_dtype)  # dx = g W
        if ctx.needs_input_grad[1]:
            dw = (g.T.to(ctx.x_dtype) @ dequant(xq, xs, ctx.x_dtype)).to(ctx.w_dtype)  # dW = g^T x
        return dx, dw, None


REFERENCE_OPS = (fp8_quantize_act, fp8_quantize_weight, fp8_gemm, fp8_dequantize)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, ops=REFERENCE_OPS) -> torch.Tensor:
    """x ``(..., K)`` fp32/bf16, weight ``(N, K)`` -> ``(..., N)`` in x.dtype via FP8 (differentiable)."""
    assert weight.dim() == 2 and x.shape[-1] == weight.shape[1], (
        f"x (..., K) and weight (N, K) must share K, got {tuple(x.shape)} and {tuple(weight.shape)}"
    )
    y = FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, ops)
    return y.view(*x.shape[:-1], weight.shape[0])
