"""Distillation losses: reference vs an independent (TRL-style) formula, Triton rows vs the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref
from kernels.testing import Tol, check_outputs

TOL = {
    torch.float32: Tol(torch.float32, atol=1e-5, rtol=1e-4),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-4, rtol=0.0, factor=2.0),
}
N, DS, DT, V = 9, 41, 24, 341
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _trl_style(zs, zt, kind, beta, temperature):
    """Per-token loss written the way TRL's generalized_jsd_loss does (F.kl_div), independently."""
    ls = F.log_softmax(zs / temperature, -1)
    lt = F.log_softmax(zt / temperature, -1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta)
    lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), 0)
    return (beta * F.kl_div(lm, lt, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)


def _inputs(dtype, n=N):
    h_s = torch.randn(n, DS).to(dtype).requires_grad_()
    w_s = (torch.randn(V, DS) / DS**0.5).to(dtype).requires_grad_()
    h_t = torch.randn(n, DT).to(dtype)
    w_t = (2 * torch.randn(V, DT) / DT**0.5).to(dtype).requires_grad_()  # must receive no gradient
    mask = torch.rand(n) > 0.3
    mask[0] = True
    return h_s, w_s, h_t, w_t, mask


def _run(fn, h_s, w_s, h_t, w_t, g, **kw):
    loss = fn(h_s, w_s, h_t, w_t, **kw)
    return [loss, *torch.autograd.grad(loss, (h_s, w_s), g if loss.dim() else g.sum())]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind,beta", KINDS + [("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_reference_matches_trl_style_formula(seed, kind, beta, reduction):
    h_s, w_s, h_t, w_t, mask = _inputs(torch.float32)
    g = torch.randn(N)

    def oracle(h_s, w_s, h_t, w_t, mask, reduction, **_):
        per = _trl_style(h_s @ w_s.T, h_t @ w_t.T, kind, beta, 1.7) * mask
        return per if reduction == "none" else per.sum() / mask.sum()

    kw = dict(mask=mask, kind=kind, beta=beta, temperature=1.7, reduction=reduction)
    got = _run(ref.fused_linear_distill_loss, h_s, w_s, h_t, w_t, g, chunk_size=4, **kw)
    want = _run(oracle, h_s, w_s, h_t, w_t, g, **kw)
    check_outputs(["loss", "dh_s", "dw_s"], got, want, TOL[torch.float32])


def test_jsd_limits_are_forward_and_reverse_kl(seed):
    h_s, w_s, h_t, w_t, mask = _inputs(torch.float32)
    loss = lambda kind, beta: ref.fused_linear_distill_loss(h_s, w_s, h_t, w_t, kind=kind, beta=beta, reduction="none")
    torch.testing.assert_close(loss("jsd", 0.0), loss("forward_kl", 0.5))
    torch.testing.assert_close(loss("jsd", 1.0), loss("reverse_kl", 0.5))
    # and beta = 0.5 is the symmetric Jensen-Shannon divergence
    sym = ref.fused_linear_distill_loss(h_t, w_t, h_s, w_s, kind="jsd", beta=0.5, reduction="none")
    torch.testing.assert_close(loss("jsd", 0.5), sym, atol=1e-6, rtol=1e-5)


def test_teacher_gets_no_gradient_and_mask_excludes_tokens(seed):
    h_s, w_s, h_t, w_t, mask = _inputs(torch.float32)
    mask[1] = False
    per = ref.fused_linear_distill_loss(h_s, w_s, h_t, w_t, mask=mask, kind="reverse_kl", reduction="none")
    assert per[1].item() == 0.0 and (per[mask] > 0).all()
    per.sum().backward()
    assert w_t.grad is None
    assert not h_s.grad[1].any(), "a masked-out token must get no gradient"


@pytest.mark.parametrize("kind,beta", KINDS)
def test_logits_version_equals_fused_version(seed, kind, beta):
    h_s, w_s, h_t, w_t, mask = _inputs(torch.float32)
    zs = (h_s @ w_s.T).detach().requires_grad_()
    a = ref.distill_loss(zs, h_t @ w_t.T, mask=mask, kind=kind, beta=beta, temperature=0.8, chunk_size=4)
    (gz,) = torch.autograd.grad(a, zs)
    b = ref.fused_linear_distill_loss(h_s, w_s, h_t, w_t, mask=mask, kind=kind, beta=beta, temperature=0.8)
    (gh,) = torch.autograd.grad(b, h_s)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gz @ w_s.detach(), gh, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_rows_match_reference(seed, dtype, kind, beta, both):
    h_s, w_s, h_t, w_t, mask = _inputs(dtype)
    g = torch.randn(N)
    kw = dict(mask=mask, kind=kind, beta=beta, temperature=1.3, reduction="mean", chunk_size=4)
    got, want = both(lambda: _run(kernels.fused_linear_distill_loss, h_s, w_s, h_t, w_t, g, **kw))
    oracle = None
    if dtype == torch.bfloat16:
        f32 = [x.detach().float().requires_grad_() for x in (h_s, w_s)]
        oracle = _run(ref.fused_linear_distill_loss, *f32, h_t.float(), w_t.detach().float(), g, **kw)
    check_outputs(["loss", "dh_s", "dw_s"], got, want, TOL[dtype], oracle)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_triton_logits_version_per_token_matches_reference(seed, kind, beta, both):
    zs = torch.randn(N, V).requires_grad_()
    zt = 2 * torch.randn(N, V)
    g = torch.randn(N)

    def run():
        loss = kernels.distill_loss(zs, zt, kind=kind, beta=beta, temperature=0.9, reduction="none", chunk_size=4)
        return [loss, *torch.autograd.grad(loss, zs, g)]

    got, want = both(run)
    check_outputs(["loss", "dlogits"], got, want, TOL[torch.float32])
