"""RMSNorm kernel vs its torch reference (output, residual output, every gradient)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.testing import Tol, assert_close, check_outputs

# (dtype, atol, rtol) for fp32; (dtype, atol, factor x torch's bf16 error) for bf16
TOL = {
    torch.float32: Tol(torch.float32, atol=1e-5, rtol=1e-5),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-3, rtol=0.0, factor=2.0),
}
SHAPES = [(9, 41, 341), (3, 1, 7), (5, 128)]


def _inputs(shape, dtype, residual):
    x = torch.randn(shape, dtype=torch.float32)
    w = 1 + 0.3 * torch.randn(shape[-1])
    r = torch.randn(shape) if residual else None
    return [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, r)]


def _run(fn, x, w, r, gouts):
    args = [t for t in (x, w, r) if t is not None]
    out = fn(x, w, 1e-6, r)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, args, [g.to(o.dtype) for o, g in zip(outs, gouts, strict=True)])
    return list(outs) + list(grads)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_kernel_matches_reference(seed, triton_backend, dtype, shape, residual):
    x, w, r = _inputs(shape, dtype, residual)
    gouts = [torch.randn(shape) for _ in range(2 if residual else 1)]
    got = _run(kernels.rms_norm, x, w, r, gouts)
    want = _run(ref.rms_norm, x, w, r, gouts)
    names = ["y", "residual_out"][: len(gouts)] + ["dx", "dweight", "dresidual"][: 2 + residual]
    oracle = None
    if dtype == torch.bfloat16:
        x32, w32, r32 = (t.detach().float().requires_grad_() if t is not None else None for t in (x, w, r))
        oracle = _run(ref.rms_norm, x32, w32, r32, gouts)
    check_outputs(names, got, want, TOL[dtype], oracle)


def test_rms_norm_reference_matches_hf_deepseek(seed):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    norm = DeepseekV3RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64))
    x = torch.randn(7, 64).to(torch.bfloat16)
    assert torch.equal(ref.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_rms_norm_residual_output_is_the_sum(seed, triton_backend):
    x, w, r = _inputs((4, 33), torch.float32, True)
    y, s = kernels.rms_norm(x, w, 1e-6, r)
    assert torch.equal(s, x + r)
    assert_close("y", y, ref.rms_norm(x + r, w, 1e-6), TOL[torch.float32])
