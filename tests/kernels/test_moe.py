"""MoE dispatch: reference vs a per-expert loop and vs the previous padded layout (idle experts, one busy
expert); Triton permute / grouped GEMM / combine vs the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
def test_no_gradient_forms_match_the_per_expert_loop(seed, skew, dtype):
    """The two forms compiled decoding traces: ``ffn_fwd`` (the ops' arithmetic; the same bits as the
    grouped ops) and ``ffn_gathered`` (one GEMV per routed row, what inductor fuses for small batches)."""
    T, K, E, D, I = 13, 3, 8, 24, 10
    x, idx, w, ws = (t.detach() if isinstance(t, torch.Tensor) else [v.detach() for v in t]
                     for t in _problem(T, K, E, D, I, dtype, skew))
    with torch.no_grad():
        want = ref.moe_ffn_loop(x, idx, w, *ws)
        fwd, gathered = ref.moe.ffn_fwd(x, idx, w, *ws), ref.moe.ffn_gathered(x, idx, w, *ws)
        routing = ref.moe_routing(idx, E)
        y = ref.moe.swiglu_mlp_fwd(ref.moe.permute_fwd(x, routing.row_slot, K), *ws, routing.offsets)[0]
        assert torch.equal(fwd, ref.moe.combine_fwd(y, routing.rows, w)), "ffn_fwd must be the ops' bits"
        oracle = None if dtype == torch.float32 else [ref.moe_ffn_loop(x.float(), idx, w, *(v.float() for v in ws))]
    check_outputs(["ffn_fwd"], [fwd], [want], TOL[dtype], oracle)
    check_outputs(["ffn_gathered"], [gathered], [want], TOL[dtype], oracle)


@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
def test_reference_matches_per_expert_loop(seed, skew):
    T, K, E, D, I = 41, 3, 8, 24, 10
    x, idx, w, ws = _problem(T, K, E, D, I, torch.float32, skew)
    g = torch.randn(T, D)
    got, want = _run(ref.moe_ffn, x, idx, w, ws, g), _run(ref.moe_ffn_loop, x, idx, w, ws, g)
    check_outputs(NAMES, got, want, TOL[torch.float32])


def test_routing_places_every_slot_once_sorted_by_expert_without_padding(seed):
    T, K, E = 29, 3, 7
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    for r in (ref.moe_routing(idx, E), kernels.moe_routing(idx, E)):
        assert r.num_rows == T * K and r.rows.unique().numel() == T * K  # exactly the routed rows, no pad rows
        row_expert = torch.repeat_interleave(torch.arange(E), r.counts)
        assert torch.equal(row_expert[r.rows], idx), "each slot must sit in its expert's segment"
        assert torch.equal(r.row_slot[r.rows.reshape(-1)], torch.arange(T * K))
        assert torch.equal(r.counts, torch.bincount(idx.reshape(-1), minlength=E))
        assert r.offsets[0] == 0 and r.offsets[-1] == T * K
        for e in range(E):  # token order within an expert (stable)
            seg = r.row_slot[r.offsets[e]:r.offsets[e + 1]]
            assert torch.equal(seg, seg.sort().values)


def _padded_previous(x, idx, w, w_gate, w_up, w_down):
    """The previous layout, as an oracle: every expert's rows zero-padded to the busiest expert's count and
    one ``torch.bmm`` per projection over ``(E, C, D)``; plain autograd."""
    T, K = idx.shape
    E, D = w_gate.shape[0], x.shape[1]
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    C = max(int(counts.max()), 1)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    pos = e_sorted * C + torch.arange(T * K) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    xb = x.new_zeros(E * C, D).index_copy(0, pos, x[order // K]).view(E, C, D)
    h = F.silu(torch.bmm(xb, w_gate.transpose(1, 2))) * torch.bmm(xb, w_up.transpose(1, 2))
    y_sorted = torch.bmm(h, w_down.transpose(1, 2)).view(E * C, D)[pos]
    y_slots = y_sorted.index_select(0, torch.argsort(order)).view(T, K, D)
    return (w.float().unsqueeze(-1) * y_slots).sum(1).to(x.dtype)


def _idle_and_busy(T, K, E, case):
    if case == "idle":  # half of the experts get no token
        return torch.stack([torch.randperm(E // 2)[:K] for _ in range(T)])
    if case == "one_busy":  # a single expert takes every token, all others idle
        return torch.full((T, K), 3)
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["balanced", "idle", "one_busy"])
def test_unpadded_moe_equals_the_previous_padded_layout(seed, case, backend):
    T, E, D, I = 23, 8, 24, 16
    K = 1 if case == "one_busy" else 3
    x, _, w, ws = _problem(T, K, E, D, I, torch.float32)
    idx = _idle_and_busy(T, K, E, case)
    g = torch.randn(T, D)
    kernels.set_backend(backend)
    try:
        got = _run(kernels.moe_ffn, x, idx, w, ws, g)
    finally:
        kernels.set_backend(None)
    check_outputs(NAMES, got, _run(_padded_previous, x, idx, w, ws, g), TOL[torch.float32])
    if case != "balanced":
        idle = torch.bincount(idx.reshape(-1), minlength=E) == 0
        for name, dw in zip(NAMES[3:], got[3:], strict=True):
            assert not dw[idle].any(), f"{name}: an idle expert's weight gradient must be exactly zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_mm_and_segment_loop_agree(seed, dtype, monkeypatch):
    """The reference multiplies segments with F.grouped_mm when it takes the operands, else a loop of mm."""
    T, K, E, D, I = 37, 2, 6, 32, 16  # widths a multiple of 8: F.grouped_mm's path
    x, _, w, ws = _problem(T, K, E, D, I, dtype)
    idx = _idle_and_busy(T, K, E, "idle")
    g = torch.randn(T, D)
    fast = _run(ref.moe_ffn, x, idx, w, ws, g)
    monkeypatch.setattr(ref.moe, "_gmm_ok", lambda *ts: False)
    loop = _run(ref.moe_ffn, x, idx, w, ws, g)
    tol = TOL[torch.float32] if dtype == torch.float32 else Tol(dtype, atol=2e-2, rtol=2e-2)
    for name, a, b in zip(NAMES, fast, loop, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol.atol, rtol=tol.rtol, msg=name)


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
    T, K, E, Din, Dout = 19, 2, 5, 41, 34
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 idle
    idx[:, 0] = 1  # expert 1 gets more than one 16-row tile; tiles end mid-tile at segment ends
    routing = ref.moe_routing(idx, E)
    x = torch.randn(routing.num_rows, Din).to(dtype).requires_grad_()
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
    routing = ref.moe_routing(idx, E)
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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_combine_and_its_backward_are_deterministic(seed, backend):
    T, K, E, D = 64, 6, 8, 33
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    routing = ref.moe_routing(idx, E)
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
