"""Torch reference for RMSNorm, optionally fused with the residual add.

Matches Hugging Face ``DeepseekV3RMSNorm`` bit for bit: the sum of squares in fp32, the normalised value
rounded to the input dtype, then multiplied by the weight and rounded again.
"""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y = weight * (s / sqrt(mean(s**2) + eps))`` over the last dim, with ``s = x (+ residual)``.

    x: ``(..., D)`` fp32 or bf16; weight: ``(D,)``; residual: like x or None.
    Returns y ``(..., D)`` in x.dtype, or ``(y, s)`` when a residual is given (``s`` = the new residual
    stream, ``x + residual`` rounded to x.dtype).
    """
    s = x if residual is None else x + residual
    s32 = s.float()
    rstd = torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight * (s32 * rstd).to(x.dtype)).to(x.dtype)
    return y if residual is None else (y, s)


def rms_norm_bwd(
    dy: torch.Tensor,
    ds_out: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``rms_norm`` (statistics recomputed in fp32): -> (ds, dweight).

    With ``n = s rstd``: ``ds = rstd (dn - n mean(dn n)) (+ ds_out)``, ``dn = dy weight``,
    ``dweight = sum over rows of dy n``. ds is the gradient of x (and of the residual), in s's dtype.
    """
    s = x if residual is None else x + residual
    s32 = s.float()
    rstd = torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    n32 = s32 * rstd
    dy32 = dy.float()
    dn = dy32 * weight.float()
    ds = (rstd * (dn - n32 * (dn * n32).mean(-1, keepdim=True))).to(s.dtype)
    if ds_out is not None:
        ds = ds + ds_out
    dw = (dy32 * n32.to(x.dtype).float()).reshape(-1, s.shape[-1]).sum(0).to(weight.dtype)
    return ds, dw
