"""Building blocks: RMSNorm, linear (optionally FP8, optionally biased), SwiGLU MLP. All math goes through ``kernels``.

Shape legend: N any leading dims, D in features, F out features, I MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` (kernels.rms_norm); with ``residual`` also returns the new residual stream."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Linear):
    """Linear layer, bias-free unless ``bias=True``; with ``fp8=True`` its GEMM runs through
    ``kernels.fp8_linear`` (the bias is added after it, in the activation dtype).

    Embeddings, the output head, the router and the norms never use this switch (DeepSeek-V3's recipe
    keeps them in higher precision).
    """

    def __init__(self, in_features: int, out_features: int, fp8: bool = False, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.fp8 = fp8

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            y_NF = kernels.fp8_linear(x_ND, self.weight)
            return y_NF if self.bias is None else y_NF + self.bias.to(y_NF.dtype)
        return F.linear(x_ND, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate x) * up x)``: the dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int, fp8: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, fp8)
        self.up_proj = Linear(dim, hidden, fp8)
        self.down_proj = Linear(hidden, dim, fp8)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x_ND), self.up_proj(x_ND)))
