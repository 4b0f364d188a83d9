"""Fused linear + cross-entropy: the chunked reference against plain torch, the Triton rows against it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref
from kernels.testing import Tol, check_outputs

TOL = {
    torch.float32: Tol(torch.float32, atol=1e-5, rtol=1e-5),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-3, rtol=0.0, factor=2.0),
}
N, D, V = 9, 41, 341  # odd on purpose


def _inputs(dtype, n=N, d=D, v=V):
    h = torch.randn(n, d).to(dtype).requires_grad_()
    w = (torch.randn(v, d) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    t[1] = -100
    return h, w, t


def _naive(h, w, t, reduction, z_loss, temperature, ignore_index=-100):
    logits = (h.float() @ w.float().T) / temperature
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    loss = loss + z_loss * torch.logsumexp(logits, -1) ** 2 * (t != ignore_index)
    if reduction == "none":
        return loss
    return loss.sum() / (t != ignore_index).sum() if reduction == "mean" else loss.sum()


def _run(fn, h, w, t, g, **kw):
    loss = fn(h, w, t, **kw)
    return [loss, *torch.autograd.grad(loss, (h, w), g if loss.dim() else g.sum())]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss,temperature", [(0.0, 1.0), (1e-3, 0.7)], ids=["plain", "zloss-temp"])
def test_reference_matches_plain_cross_entropy(seed, reduction, z_loss, temperature):
    h, w, t = _inputs(torch.float32, n=37, d=16, v=50)
    g = torch.randn(37)
    kw = dict(reduction=reduction, z_loss=z_loss, temperature=temperature)
    got = _run(ref.fused_linear_cross_entropy, h, w, t, g, chunk_size=8, **kw)
    want = _run(_naive, h, w, t, g, **kw)
    check_outputs(["loss", "dh", "dweight"], got, want, TOL[torch.float32])


def test_reference_chunk_size_does_not_change_the_result(seed):
    h, w, t = _inputs(torch.float32, n=37, d=16, v=50)
    g = torch.ones(())
    a = _run(ref.fused_linear_cross_entropy, h, w, t, g, chunk_size=5)
    b = _run(ref.fused_linear_cross_entropy, h, w, t, g, chunk_size=64)
    check_outputs(["loss", "dh", "dweight"], a, b, TOL[torch.float32])


def test_all_ignored_tokens_give_zero_loss_and_zero_gradients(seed):
    h, w, t = _inputs(torch.float32, n=6, d=8, v=20)
    t[:] = -100
    loss, dh, dw = _run(ref.fused_linear_cross_entropy, h, w, t, torch.ones(()))
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_none_reduction_gives_token_log_probs(seed):
    h, w, t = _inputs(torch.float32, n=7, d=8, v=20)
    t[1] = 3
    per_tok = ref.fused_linear_cross_entropy(h, w, t, reduction="none")
    logp = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(-per_tok, logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_rows_match_reference(seed, dtype, reduction, both):
    h, w, t = _inputs(dtype)
    g = torch.randn(N)
    kw = dict(reduction=reduction, z_loss=1e-3, temperature=0.7, chunk_size=4)
    got, want = both(lambda: _run(kernels.fused_linear_cross_entropy, h, w, t, g, **kw))
    oracle = None
    if dtype == torch.bfloat16:
        h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
        oracle = _run(ref.fused_linear_cross_entropy, h32, w32, t, g, **kw)
    check_outputs(["loss", "dh", "dweight"], got, want, TOL[dtype], oracle)


def test_triton_rows_kernel_writes_every_gradient_element(seed, triton_backend):
    from kernels.triton_ops.cross_entropy import cross_entropy_rows

    z = torch.randn(5, 77)
    t = torch.tensor([0, 76, -100, 3, 40])
    z_ref = z.clone()
    loss = cross_entropy_rows(z, t, -100, 0.0, 1.0, True)
    loss_ref = ref.cross_entropy_rows(z_ref, t, -100, 0.0, 1.0, True)
    check_outputs(["loss", "dlogits"], [loss, z], [loss_ref, z_ref], TOL[torch.float32])
    assert not z[2].any(), "an ignored token must get a zero gradient"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_exist_one_chunk_at_a_time(seed, reduction):
    """The engine never builds more than chunk_size x V logits, in the forward or the backward."""
    h, w, t = _inputs(torch.float32, n=50, d=8, v=30)
    seen = []

    def rows(z, targets, *args):
        seen.append(z.shape[0])
        return ref.cross_entropy_rows(z, targets, *args)

    loss = ref.fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=16, rows=rows)
    loss.sum().backward()
    assert max(seen) <= 16 and sum(seen) == 50 * (2 if reduction == "none" else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["reference", "custom-op"])
def test_none_in_one_chunk_keeps_its_rows_and_gives_the_recomputed_bits(seed, monkeypatch, op, dtype):
    """Reduction none with every token in one chunk: the forward keeps d loss / d logits, so the backward
    computes no logits (one row-function call in all), and the result is the recomputing backward's, bit
    for bit (the same operations on the same values)."""
    from kernels.reference import chunked

    h, w, t = _inputs(dtype, n=50, d=8, v=30)
    g = torch.randn(50)
    seen = []

    def rows(z, targets, *args):
        seen.append(z.shape[0])
        return ref.cross_entropy_rows(z, targets, *args)

    def run():
        kw = dict(reduction="none", temperature=0.7, chunk_size=64)
        if op == "reference":
            return _run(lambda *a, **k: ref.fused_linear_cross_entropy(*a, **k, rows=rows), h, w, t, g, **kw)
        monkeypatch.setattr("kernels.reference.cross_entropy.cross_entropy_rows", rows)
        return _run(kernels.fused_linear_cross_entropy, h, w, t, g, **kw)

    kept = run()
    assert seen == [50]
    monkeypatch.setattr(chunked, "keeps_rows", lambda *a: False)
    monkeypatch.setattr("kernels.ops.keeps_rows", lambda *a: False)
    seen.clear()
    recomputed = run()
    assert seen == [50, 50]
    for name, a, b in zip(["loss", "dh", "dweight"], kept, recomputed, strict=True):
        assert torch.equal(a, b), name


def test_default_chunk_holds_about_as_many_logits_as_hidden_states():
    assert ref.default_chunk_size(8192, 4096, 128256) == 256  # Liger's rule at Llama-3 scale
    assert ref.default_chunk_size(8192, 512, 32768) == 256  # floor of 2**23 logits
    assert ref.default_chunk_size(9, 41, 341) == 9
