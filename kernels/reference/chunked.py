"""Chunked "linear layer + per-token loss" engine shared by fused cross-entropy and fused distillation.

``loss_t = f(h_t W^T)`` is computed ``chunk`` tokens at a time, so at most ``chunk x V`` logits exist at
once (never ``N x V``). The per-chunk work -- loss and d loss / d logits, in place over the fp32 logits --
is a *row function*: the torch reference (``cross_entropy_rows``, ``distill_rows``) or a Triton kernel
with the same contract. This module is the host side both backends share.

Gradients. With ``G`` = d loss / d logits of a chunk (already scaled by the reduction):
``dh_chunk = G W`` and ``dW += G^T h_chunk`` (fp32 accumulator).
- reduction ``mean``/``sum`` (a scalar loss): G is computed during the forward and dh, dW are kept, so the
  backward only scales them by the incoming scalar (3 GEMMs in all, Liger-Kernel's scheme);
- reduction ``none`` (per-token losses, e.g. RL token log-probs): the upstream gradient weighs every token
  differently, so the forward cannot finish dh and dW. When all the tokens fit one chunk, the forward keeps
  that chunk's G (unscaled, fp32: no more memory than the chunk's logits, now held until the backward) and
  the backward weighs it (3 GEMMs, no second softmax pass); otherwise the backward recomputes each chunk's
  logits (4 GEMMs). Both give the same bits: the same operations on the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# row_fn(logits_chunk (C, V) fp32, start, end, compute_grad) -> per-token loss (C,) fp32. With
# compute_grad it overwrites logits_chunk with d loss_t / d logits_t (unreduced, unmasked by the engine).
RowFn = Callable[[torch.Tensor, int, int, bool], torch.Tensor]

REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: one chunk of logits about as large as the hidden states (Liger-Kernel's rule), but
    at least 2**23 logits (32 MiB fp32) -- smaller chunks starve the GEMMs and re-accumulate dW too often."""
    target = max(n_tokens * hidden, 1 << 23)
    chunk = 1 << max(0, round(math.log2(max(1.0, target / max(vocab, 1)))))
    return max(1, min(chunk, n_tokens))


def _logits(h_c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = h_c @ w.T
    return z if z.dtype == torch.float32 else z.float()


def _accumulate_dw(dw: torch.Tensor, g: torch.Tensor, h_c: torch.Tensor) -> None:
    """dw (fp32) += g^T h_c, in place inside the GEMM when the operands are fp32."""
    if g.dtype == torch.float32:
        dw.addmm_(g.T, h_c)
    else:
        dw += (g.T @ h_c).float()


def keeps_rows(n_tokens: int, reduction: str, chunk: int, need_dh: bool, need_dw: bool) -> bool:
    """Whether the forward of reduction ``none`` keeps d loss_t / d logits_t for the backward (one chunk)."""
    return reduction == "none" and (need_dh or need_dw) and n_tokens <= chunk


def chunked_forward(h, w, valid, row_fn: RowFn, reduction: str, chunk: int, need_dh: bool, need_dw: bool):
    """-> (loss, dh, dw32): the reduced loss (or ``(N,)`` losses) and, for ``mean``/``sum`` with need_dh /
    need_dw, d loss / d h ``(N, d)`` in h's dtype and d loss / d w ``(V, d)`` fp32 (else None). For ``none``
    when `keeps_rows`: (losses, G = d loss_t / d logits_t ``(N, V)`` fp32, None)."""
    N = h.shape[0]
    if keeps_rows(N, reduction, chunk, need_dh, need_dw):
        z = _logits(h, w)
        loss = row_fn(z, 0, N, True) * valid
        return loss, z, None
    n_valid = valid.sum()
    # per-token factor of the reduction: mean divides by the number of valid tokens (at least 1)
    scale = valid.float() / n_valid.clamp(min=1) if reduction == "mean" else valid.float()
    precompute = (need_dh or need_dw) and reduction != "none"
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if precompute and need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if precompute and need_dw else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        z = _logits(h[s:e], w)
        loss[s:e] = row_fn(z, s, e, precompute)
        if precompute:
            g = z.mul_(scale[s:e, None]).to(h.dtype)  # d (reduced loss) / d logits
            if dh is not None:
                torch.mm(g, w, out=dh[s:e])
            if dw is not None:
                _accumulate_dw(dw, g, h[s:e])
    loss = loss * valid
    if reduction == "none":
        return loss, dh, dw
    total = loss.sum()
    return (total / n_valid.clamp(min=1) if reduction == "mean" else total), dh, dw


def chunked_backward(h, w, valid, row_fn: RowFn | None, chunk: int, grad, need_dh: bool, need_dw: bool,
                     rows: torch.Tensor | None = None):
    """Backward of reduction ``none``: weigh d loss_t by ``grad[t]``, with d loss / d logits from ``rows``
    (what the forward kept, see `keeps_rows`) or recomputed chunk by chunk with ``row_fn``.
    -> (dh in h's dtype or None, dw in w's dtype or None)."""
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    g_tok = grad.float() * valid
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        if rows is not None:
            g = (rows[s:e] * g_tok[s:e, None]).to(h.dtype)
        else:
            assert row_fn is not None
            z = _logits(h[s:e], w)
            row_fn(z, s, e, True)
            g = z.mul_(g_tok[s:e, None]).to(h.dtype)
        if dh is not None:
            torch.mm(g, w, out=dh[s:e])
        if dw is not None:
            _accumulate_dw(dw, g, h[s:e])
    return dh, None if dw is None else dw.to(w.dtype)


def scale_precomputed(dh, dw, grad, w_dtype):
    """Backward of reduction ``mean``/``sum``: the forward's gradients times the incoming scalar."""
    return (None if dh is None else dh * grad.to(dh.dtype)), (None if dw is None else (dw * grad).to(w_dtype))


class ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, valid, row_fn, reduction, chunk):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out, dh, dw = chunked_forward(h, w, valid, row_fn, reduction, chunk, need_dh, need_dw)
        ctx.reduction, ctx.chunk, ctx.row_fn, ctx.w_dtype = reduction, chunk, row_fn, w.dtype
        if reduction != "none":
            ctx.save_for_backward(dh, dw)
        elif need_dh or need_dw:  # dh holds the kept rows G when keeps_rows, else None
            ctx.save_for_backward(h, w, valid, dh)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            return (*scale_precomputed(*ctx.saved_tensors, grad, ctx.w_dtype), None, None, None, None)
        h, w, valid, rows = ctx.saved_tensors
        dh, dw = chunked_backward(h, w, valid, ctx.row_fn, ctx.chunk, grad, *ctx.needs_input_grad[:2], rows=rows)
        return dh, dw, None, None, None, None


def chunked_linear_loss(
    h: torch.Tensor,
    w: torch.Tensor,
    valid: torch.Tensor,
    row_fn: RowFn,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Run ``row_fn`` over chunks of ``h @ w.T``; reduce the per-token losses over the ``valid`` tokens.

    h ``(N, d)`` fp32/bf16 (2-D, contiguous); w ``(V, d)`` same dtype; valid ``(N,)`` bool.
    Returns a scalar (mean over valid tokens -- 0 when there are none -- or sum) or ``(N,)`` fp32 losses
    (0 at invalid tokens) for ``reduction="none"``.
    """
    chunk = check_chunked_args(h, w, valid, reduction, chunk_size)
    return ChunkedLinearLoss.apply(h.contiguous(), w.contiguous(), valid, row_fn, reduction, chunk)


def check_chunked_args(h, w, valid, reduction: str, chunk_size: int | None) -> int:
    """Assert the engine's preconditions; -> the chunk size (``default_chunk_size`` when None)."""
    assert reduction in REDUCTIONS, f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
    assert h.dim() == 2 and w.dim() == 2, f"h must be (N, d) and w (V, d), got {tuple(h.shape)}, {tuple(w.shape)}"
    assert h.shape[1] == w.shape[1], f"hidden sizes differ: h {tuple(h.shape)} vs weight {tuple(w.shape)}"
    assert h.dtype == w.dtype, f"h and weight dtypes differ: {h.dtype} vs {w.dtype}"
    assert h.dtype in (torch.float32, torch.bfloat16), f"h must be fp32 or bf16, got {h.dtype}"
    assert valid.shape == (h.shape[0],) and valid.dtype == torch.bool, "valid must be (N,) bool"
    chunk = chunk_size or default_chunk_size(h.shape[0], h.shape[1], w.shape[0])
    assert chunk >= 1, f"chunk_size must be >= 1, got {chunk}"
    return chunk
