"""Torch reference for distillation losses between student and teacher distributions, chunked.

With ``s = softmax(z_s / T)``, ``t = softmax(z_t / T)`` per token (T = temperature; no T**2 factor):
- ``forward_kl``: ``KL(t || s) = sum t (log t - log s)``         (mode covering; the usual KD loss)
- ``reverse_kl``: ``KL(s || t) = sum s (log s - log t)``         (mode seeking)
- ``jsd``: generalised Jensen-Shannon, TRL/Liger convention: ``m = (1 - beta) s + beta t`` and
  ``beta KL(t || m) + (1 - beta) KL(s || m)``; ``beta = 0`` is defined as forward KL and ``beta = 1`` as
  reverse KL (as TRL's ``generalized_jsd_loss`` and Liger's JSD do); ``beta = 0.5`` is the symmetric JSD.

Gradient w.r.t. the student logits (d/dz = s * (g - <s, g>) / T for g = d loss / d s):
forward KL ``(s - t) / T``; reverse KL ``s (a - <s, a>) / T`` with ``a = log s - log t``;
JSD ``s (b - <s, b>) / T`` with ``b = (1 - beta)(log s - log m)``. The teacher gets no gradient.
"""

from __future__ import annotations

import math

import torch

from .chunked import RowFn, chunked_linear_loss

KINDS = ("forward_kl", "reverse_kl", "jsd")


def resolve_kind(kind: str, beta: float) -> str:
    """The branch a (kind, beta) pair computes: jsd at beta 0 / 1 is forward / reverse KL."""
    assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
    if kind == "jsd":
        assert 0.0 <= beta <= 1.0, f"jsd beta must be in [0, 1], got {beta}"
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return kind


def distill_rows(
    zs: torch.Tensor, zt: torch.Tensor, kind: str, beta: float, temperature: float, compute_grad: bool
) -> torch.Tensor:
    """Row function: zs, zt ``(C, V)`` fp32 raw student / teacher logits -> per-token loss ``(C,)`` fp32.
    With compute_grad, zs is overwritten with d loss / d zs."""
    kind = resolve_kind(kind, beta)
    ls = torch.log_softmax(zs / temperature, dim=-1)
    lt = torch.log_softmax(zt / temperature, dim=-1)
    s = ls.exp()
    if kind == "forward_kl":
        t = lt.exp()
        loss = (t * (lt - ls)).sum(-1)
        if compute_grad:
            torch.sub(s, t, out=zs).div_(temperature)
        return loss
    if kind == "reverse_kl":
        g = ls - lt
        loss = (s * g).sum(-1)
    else:
        lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
        loss = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (s * (ls - lm)).sum(-1)
        g = (1 - beta) * (ls - lm)
    if compute_grad:
        torch.mul(s, g - (s * g).sum(-1, keepdim=True), out=zs).div_(temperature)
    return loss


def check_distill_args(h_s, w_s, h_t, w_t, mask, kind, beta, temperature) -> None:
    assert h_s.dim() == 2 and h_t.dim() == 2, f"h_s, h_t must be 2-D, got {tuple(h_s.shape)}, {tuple(h_t.shape)}"
    assert h_s.shape[0] == h_t.shape[0], f"student and teacher token counts differ: {h_s.shape[0]} vs {h_t.shape[0]}"
    assert w_s.shape[0] == w_t.shape[0], f"vocab sizes differ: student {w_s.shape[0]} vs teacher {w_t.shape[0]}"
    assert w_t.shape[1] == h_t.shape[1], f"teacher weight {tuple(w_t.shape)} does not match h_t {tuple(h_t.shape)}"
    assert mask is None or mask.shape == (h_s.shape[0],), f"mask must be ({h_s.shape[0]},)"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    resolve_kind(kind, beta)


def distill_row_fn(h_t, w_t, kind, beta, temperature, rows=None) -> RowFn:
    rows = rows or distill_rows

    def fn(z, s, e, grad):
        zt = h_t[s:e] @ w_t.T
        return rows(z, zt if zt.dtype == torch.float32 else zt.float(), kind, beta, temperature, grad)

    return fn


def fused_linear_distill_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    rows=None,
) -> torch.Tensor:
    """Distillation loss between student ``h_s @ w_s.T`` and teacher ``h_t @ w_t.T``, chunked over tokens.

    h_s ``(N, ds)``, w_s ``(V, ds)`` (fp32/bf16, differentiable); h_t ``(N, dt)``, w_t ``(V, dt)``
    (no gradient); mask ``(N,)`` bool or None (all tokens). Reduction over masked-in tokens: mean
    (0 if none), sum, or none ``(N,)`` fp32 (0 where masked out).
    """
    check_distill_args(h_s, w_s, h_t, w_t, mask, kind, beta, temperature)
    valid = torch.ones(h_s.shape[0], dtype=torch.bool, device=h_s.device) if mask is None else mask.bool()
    row_fn = distill_row_fn(h_t.detach(), w_t.detach(), kind, beta, temperature, rows)
    return chunked_linear_loss(h_s, w_s, valid, row_fn, reduction, chunk_size)


def logits_distill_fwd(zs, zt, valid, row_fn, reduction: str, chunk: int, need_grad: bool):
    """-> (loss, d loss / d zs in zs's dtype or None): the reduced loss (``(N,)`` for ``none``) and, with
    need_grad, the per-token gradient (scaled by the reduction for ``mean``/``sum``, unscaled for ``none``)."""
    N = zs.shape[0]
    n_valid = valid.sum()
    scale = valid.float() / n_valid.clamp(min=1) if reduction == "mean" else valid.float()
    loss = torch.empty(N, dtype=torch.float32, device=zs.device)
    grad = torch.empty_like(zs) if need_grad else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        z = zs[s:e].float().clone() if zs.dtype == torch.float32 else zs[s:e].float()
        loss[s:e] = row_fn(z, zt[s:e].float(), need_grad)
        if need_grad:
            grad[s:e] = z if reduction == "none" else z.mul_(scale[s:e, None])
    loss = loss * valid
    if reduction == "none":
        return loss, grad
    return (loss.sum() / n_valid.clamp(min=1) if reduction == "mean" else loss.sum()), grad


def logits_distill_bwd(grad, valid, g, reduction: str):
    """d (upstream) / d zs from the forward's per-token gradient ``grad`` and the incoming ``g``."""
    if reduction == "none":
        return grad * (g.float() * valid)[:, None].to(grad.dtype)
    return grad * g.to(grad.dtype)


class _LogitsDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, valid, row_fn, reduction, chunk):
        loss, grad = logits_distill_fwd(zs, zt, valid, row_fn, reduction, chunk, ctx.needs_input_grad[0])
        ctx.reduction = reduction
        ctx.save_for_backward(grad, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        grad, valid = ctx.saved_tensors
        return logits_distill_bwd(grad, valid, g, ctx.reduction), None, None, None, None, None


def check_logits_distill_args(student_logits, teacher_logits, mask, kind, beta, temperature, reduction, chunk_size):
    """Assert the preconditions of ``distill_loss``; -> (valid ``(N,)`` bool, chunk size)."""
    assert student_logits.shape == teacher_logits.shape and student_logits.dim() == 2, (
        f"logits must both be (N, V), got {tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}"
    )
    assert reduction in ("mean", "sum", "none"), f"reduction must be mean|sum|none, got {reduction!r}"
    assert mask is None or mask.shape == (student_logits.shape[0],), f"mask must be ({student_logits.shape[0]},)"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    resolve_kind(kind, beta)
    N, V = student_logits.shape
    valid = torch.ones(N, dtype=torch.bool, device=student_logits.device) if mask is None else mask.bool()
    return valid, chunk_size or max(16, min(N, (1 << 22) // max(V, 1)))


def logits_row_fn(kind, beta, temperature, rows=None):
    rows = rows or distill_rows
    return lambda z, zt, grad: rows(z, zt, kind, beta, temperature, grad)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    rows=None,
) -> torch.Tensor:
    """Same losses on given logits ``(N, V)`` (student differentiable, teacher detached), chunked rows."""
    valid, chunk = check_logits_distill_args(student_logits, teacher_logits, mask, kind, beta, temperature,
                                             reduction, chunk_size)
    return _LogitsDistill.apply(student_logits, teacher_logits.detach(), valid,
                                logits_row_fn(kind, beta, temperature, rows), reduction, chunk)
