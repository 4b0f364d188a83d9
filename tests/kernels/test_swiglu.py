"""SwiGLU kernel vs its torch reference (output and both gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref
from kernels.testing import Tol, check_outputs

TOL = {
    torch.float32: Tol(torch.float32, atol=1e-6, rtol=1e-5),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-3, rtol=0.0, factor=2.0),
}


def _run(fn, g, u, dy):
    y = fn(g, u)
    return [y, *torch.autograd.grad(y, (g, u), dy.to(y.dtype))]


@pytest.mark.parametrize("shape", [(9, 41, 341), (1, 5), (3, 1024)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_kernel_matches_reference(seed, triton_backend, dtype, shape):
    g = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    u = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape)
    got, want = _run(kernels.swiglu, g, u, dy), _run(ref.swiglu, g, u, dy)
    names = ["y", "dgate", "dup"]
    oracle = None
    if dtype == torch.bfloat16:
        g32, u32 = (t.detach().float().requires_grad_() for t in (g, u))
        oracle = _run(ref.swiglu, g32, u32, dy)
    check_outputs(names, got, want, TOL[dtype], oracle)


def test_swiglu_reference_is_silu_gate_times_up(seed):
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(ref.swiglu(g, u), F.silu(g) * u)
