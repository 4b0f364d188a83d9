"""FP8 block scaling: reference semantics on CPU; Triton kernels bit-exact (quantisation) and close (GEMM)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.testing import Tol, assert_close

# CPU (interpreter): exact fp32 products, only the in-tile summation order differs. GPU: FP8 tensor cores
# accumulate a 128-wide tile with ~14 mantissa bits (DeepSeek-V3 report, sec. 3.3.2), hence the wider bound.
GEMM_TOL = (Tol(torch.float32, atol=1e-4, rtol=1e-5) if os.environ.get("MOEFLOW_KERNEL_TESTS_DEVICE", "cpu") == "cpu"
            else Tol(torch.float32, atol=5e-2, rtol=1e-2))


def _spread(shape, dtype=torch.float32):
    """Values over many binades (so subnormal e4m3 codes occur) with one all-zero tile."""
    x = torch.randn(shape) * torch.logspace(-5, 2, shape[-1])
    x.view(-1, shape[-1])[0, :128] = 0
    return x.to(dtype)


def test_reference_act_quantisation_follows_deepseek_recipe(seed):
    x = _spread((5, 300))
    q, s = ref.fp8_quantize_act(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    tiles = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    torch.testing.assert_close(s, tiles.abs().amax(-1).clamp(min=1e-4) / 448.0, atol=0, rtol=0)
    assert s[0, 0].item() == pytest.approx(1e-4 / 448.0)  # the all-zero tile: amax floored
    deq = ref.fp8_dequantize(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 below
    err = (deq - x).abs()
    assert (err <= x.abs() * 2**-4 + ref.fp8.expand_scale(s, x.shape, False) * 2**-10).all()


def test_reference_weight_quantisation_uses_128x128_blocks(seed):
    w = torch.randn(130, 260)
    q, s = ref.fp8_quantize_weight(w)
    assert s.shape == (2, 3)
    assert s[1, 2].item() == pytest.approx(w[128:, 256:].abs().max().item() / 448.0, rel=1e-6)
    assert q.float().abs().max().item() == 448.0


def test_reference_gemm_equals_dequantised_matmul(seed):
    a, b = torch.randn(7, 300), torch.randn(33, 300)
    (aq, asc), (bq, bsc) = ref.fp8_quantize_act(a), ref.fp8_quantize_weight(b)
    c = ref.fp8_gemm(aq, asc, bq, bsc, torch.float32)
    exact = ref.fp8_dequantize(aq, asc).double() @ ref.fp8_dequantize(bq, bsc).double().T
    torch.testing.assert_close(c.double(), exact, atol=1e-4, rtol=1e-5)
    assert (c - a @ b.T).abs().max() < 0.1 * (a @ b.T).abs().max()  # and close to the unquantised product


def test_kernel_e4m3_rounding_matches_torch_at_every_code_and_midpoint(seed, triton_backend):
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[~codes.isnan()].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mids, mids.nextafter(torch.tensor(-1e9)), mids.nextafter(torch.tensor(1e9))])
    vals = vals[vals.abs() <= 448]
    vals = vals[torch.randperm(vals.numel())]
    rows = vals.split(127)
    x = torch.zeros(len(rows), 128)
    x[:, 0] = 448.0  # scale exactly 1: the tile values are quantised as they are
    for i, r in enumerate(rows):
        x[i, 1 : 1 + r.numel()] = r
    q, s = kernels.fp8_quantize_act(x)
    q_ref, s_ref = ref.fp8_quantize_act(x)
    assert (s == 1).all()
    assert torch.equal(q.float(), q_ref.float()), "e4m3 rounding differs from torch's"


@pytest.mark.parametrize("shape", [(9, 41, 341), (3, 128), (1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_act_quantise_and_dequantise_are_bit_exact(seed, triton_backend, dtype, shape):
    x = _spread(shape, dtype)
    q, s = kernels.fp8_quantize_act(x)
    q_ref, s_ref = ref.fp8_quantize_act(x)
    assert torch.equal(s, s_ref), "scales differ"
    assert torch.equal(q.float(), q_ref.float()), "e4m3 values differ"
    assert torch.equal(kernels.fp8_dequantize(q, s), ref.fp8_dequantize(q_ref, s_ref))


@pytest.mark.parametrize("shape", [(130, 300), (128, 128), (5, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_weight_quantise_and_dequantise_are_bit_exact(seed, triton_backend, dtype, shape):
    w = (3 * torch.randn(shape)).to(dtype)
    q, s = kernels.fp8_quantize_weight(w)
    q_ref, s_ref = ref.fp8_quantize_weight(w)
    assert torch.equal(s, s_ref), "scales differ"
    assert torch.equal(q.float(), q_ref.float()), "e4m3 values differ"
    assert torch.equal(kernels.fp8_dequantize(q, s), ref.fp8_dequantize(q_ref, s_ref))
    assert torch.equal(kernels.fp8_dequantize(q, s, torch.bfloat16), ref.fp8_dequantize(q_ref, s_ref, torch.bfloat16))


@pytest.mark.parametrize("mnk", [(9, 41, 341), (16, 128, 256), (1, 130, 7)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_gemm_matches_reference(seed, triton_backend, mnk):
    M, N, K = mnk
    (aq, asc), (bq, bsc) = ref.fp8_quantize_act(torch.randn(M, K)), ref.fp8_quantize_weight(torch.randn(N, K))
    c = kernels.fp8_gemm(aq, asc, bq, bsc, torch.float32)
    assert_close("C", c, ref.fp8_gemm(aq, asc, bq, bsc, torch.float32), GEMM_TOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp8_linear_forward_and_straight_through_backward(seed, backend):
    x = torch.randn(2, 5, 260, requires_grad=True)
    w = torch.randn(70, 260, requires_grad=True)
    g = torch.randn(2, 5, 70)
    kernels.set_backend(backend)
    try:
        y = kernels.fp8_linear(x, w)
        dx, dw = torch.autograd.grad(y, (x, w), g)
    finally:
        kernels.set_backend(None)
    (xq, xs), (wq, ws) = ref.fp8_quantize_act(x.detach()), ref.fp8_quantize_weight(w.detach())
    x_deq, w_deq = ref.fp8_dequantize(xq, xs), ref.fp8_dequantize(wq, ws)
    assert_close("y", y, x_deq @ w_deq.T, GEMM_TOL)
    assert_close("dx", dx, g @ w_deq, GEMM_TOL)
    assert_close("dw", dw, g.reshape(-1, 70).T @ x_deq.reshape(-1, 260), GEMM_TOL)
