"""MoE dispatch: reference vs a per-expert loop; Triton permute / grouped GEMM / combine vs the reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.testing import Tol, check_outputs

TOL = {
    torch.float32: Tol(torch.float32, atol=1e-5, rtol=1e-4),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-3, rtol=0.0, factor=4.0),
}
NAMES = ["out", "dx", "dtopk_weight", "dw_gate", "dw_up", "dw_down"]


def _problem(T, K, E, D, I, dtype, skew=False):
    x = torch.randn(T, D).to(dtype).requires_grad_()
    if skew:  # most tokens pick expert 0 (an unbalanced router), some experts get none
        idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E // 2)[: K - 1]])
                           for _ in range(T)])
    else:
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K), -1).requires_grad_()
    ws = [(torch.randn(E, I, D) / D**0.5).to(dtype).requires_grad_(),
          (torch.randn(E, I, D) / D**0.5).to(dtype).requires_grad_(),
          (torch.randn(E, D, I) / I**0.5).to(dtype).requires_grad_()]
    return x, idx, w, ws


def _run(fn, x, idx, w, ws, g):
    out = fn(x, idx, w, *ws)
    return [out, *torch.autograd.grad(out, (x, w, *ws), g.to(out.dtype))]


@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
def test_reference_matches_per_expert_loop(seed, skew):
    T, K, E, D, I = 41, 3, 8, 24, 10
    x, idx, w, ws = _problem(T, K, E, D, I, torch.float32, skew)
    g = torch.randn(T, D)
    got, want = _run(ref.moe_ffn, x, idx, w, ws, g), _run(ref.moe_ffn_loop, x, idx, w, ws, g)
    check_outputs(NAMES, got, want, TOL[torch.float32])


@pytest.mark.parametrize("block", [None, 1, 16])
def test_routing_places_every_slot_once_grouped_by_expert(seed, block):
    T, K, E = 29, 3, 7
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    r = ref.moe_routing(idx, E, block=block)
    assert r.num_rows % r.block == 0 and r.rows.unique().numel() == T * K
    row_expert = r.block_expert.repeat_interleave(r.block)
    assert torch.equal(row_expert[r.rows], idx), "each slot must sit in a block of its expert"
    slots = torch.arange(T * K)
    assert torch.equal(r.row_slot[r.rows.reshape(-1)], slots)
    assert (r.row_slot == T * K).sum() == r.num_rows - T * K  # the rest are pad rows
    assert torch.equal(r.counts, torch.bincount(idx.reshape(-1), minlength=E))


def test_reference_switches_to_blocks_when_the_router_is_unbalanced(seed):
    T, K, E = 300, 2, 64
    idx = torch.stack([torch.tensor([0, 1 + t % 63]) for t in range(T)])  # expert 0 takes every token
    assert ref.moe_routing(idx, E).num_rows == E * T  # one block per expert would be E x larger
    x, _, w, ws = _problem(T, K, E, 8, 4, torch.float32)
    g = torch.randn(T, 8)
    check_outputs(NAMES, _run(ref.moe_ffn, x, idx, w, ws, g), _run(ref.moe_ffn_loop, x, idx, w, ws, g),
                  TOL[torch.float32])


@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_moe_ffn_matches_reference(seed, dtype, skew, both):
    T, K, E, D, I = 19, 3, 5, 40, 24
    x, idx, w, ws = _problem(T, K, E, D, I, dtype, skew)
    g = torch.randn(T, D)
    got, want = both(lambda: _run(kernels.moe_ffn, x, idx, w, ws, g))
    oracle = None
    if dtype == torch.bfloat16:
        f32 = [t.detach().float().requires_grad_() for t in (x, *ws)]
        oracle = _run(ref.moe_ffn, f32[0], idx, w, f32[1:], g)
    check_outputs(NAMES, got, want, TOL[dtype], oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_grouped_gemm_matches_reference(seed, dtype, both):
    T, K, E, Din, Dout = 9, 2, 4, 41, 34
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:, 0] = 1  # expert 1 gets two row blocks, some expert may get none
    routing = ref.moe_routing(idx, E, block=16)
    x = torch.randn(routing.num_rows, Din)
    x[routing.row_slot == T * K] = 0  # pad rows are zero, as moe_permute makes them
    x = x.to(dtype).requires_grad_()
    w = torch.randn(E, Dout, Din).to(dtype).requires_grad_()
    g = torch.randn(routing.num_rows, Dout)

    def run(x=x, w=w):
        y = kernels.grouped_gemm(x, w, routing)
        return [y, *torch.autograd.grad(y, (x, w), g.to(y.dtype))]

    got, want = both(run)
    oracle = None
    if dtype == torch.bfloat16:
        kernels.set_backend("torch")
        oracle = run(x.detach().float().requires_grad_(), w.detach().float().requires_grad_())
        kernels.set_backend(None)
    check_outputs(["y", "dx", "dw"], got, want, TOL[dtype], oracle)


def test_triton_permute_and_combine_match_reference(seed, both):
    T, K, E, D = 13, 3, 6, 41
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    routing = ref.moe_routing(idx, E, block=16)
    x = torch.randn(T, D, requires_grad=True)
    y = torch.randn(routing.num_rows, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    gp, gc = torch.randn(routing.num_rows, D), torch.randn(T, D)

    def run():
        xp = kernels.moe_permute(x, routing)
        out = kernels.moe_combine(y, routing, w)
        return [xp, *torch.autograd.grad(xp, x, gp), out, *torch.autograd.grad(out, (y, w), gc)]

    got, want = both(run)
    check_outputs(["x_perm", "dx", "combined", "dy_perm", "dtopk_weight"], got, want, TOL[torch.float32])
    assert not got[0][routing.row_slot == T * K].any(), "pad rows must be zero"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_combine_and_its_backward_are_deterministic(seed, backend):
    T, K, E, D = 64, 6, 8, 33
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    routing = ref.moe_routing(idx, E, block=16)
    y = torch.randn(routing.num_rows, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    kernels.set_backend(backend)
    try:
        runs = []
        for _ in range(3):
            out = kernels.moe_combine(y, routing, w)
            xp = kernels.moe_permute(x, routing)
            runs.append([out, *torch.autograd.grad(out, (y, w), g),
                         *torch.autograd.grad(xp, x, torch.ones_like(xp))])
    finally:
        kernels.set_backend(None)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b), "results must be bitwise identical run to run"


def test_triton_moe_ffn_forward_and_backward_are_deterministic(seed, triton_backend):
    T, K, E, D, I = 33, 4, 5, 24, 16
    x, idx, w, ws = _problem(T, K, E, D, I, torch.float32)
    g = torch.randn(T, D)
    first, second = (_run(kernels.moe_ffn, x, idx, w, ws, g) for _ in range(2))
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
