"""Torch reference for fused linear + cross-entropy (chunked; never holds N x V logits).

Per token t with logits ``z = h_t W^T / temperature`` and target y:
``loss_t = logsumexp(z) - z_y + z_loss * logsumexp(z)**2`` (the z-loss of PaLM / ST-MoE), 0 where
``y == ignore_index``. Gradient w.r.t. the raw logits ``h_t W^T``:
``(softmax(z) * (1 + 2 z_loss lse) - onehot(y)) / temperature``.
"""

from __future__ import annotations

import torch

from .chunked import RowFn, chunked_linear_loss


def cross_entropy_rows(
    z: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    temperature: float,
    compute_grad: bool,
) -> torch.Tensor:
    """Row function: z ``(C, V)`` fp32 raw logits (overwritten with d loss / d z if compute_grad),
    targets ``(C,)`` int64 -> per-token loss ``(C,)`` fp32 (0 at ignored tokens)."""
    if temperature != 1.0:
        z.div_(temperature)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, safe_t[:, None]).squeeze(1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:
        p = z.sub_(lse[:, None]).exp_()
        if z_loss:
            p.mul_((1 + 2 * z_loss * lse)[:, None])
        p[torch.arange(p.shape[0], device=p.device), safe_t] -= 1.0
        p.mul_((valid.float() / temperature)[:, None])
    return loss


def ce_row_fn(targets: torch.Tensor, ignore_index: int, z_loss: float, temperature: float, rows=None) -> RowFn:
    rows = rows or cross_entropy_rows
    return lambda z, s, e, grad: rows(z, targets[s:e], ignore_index, z_loss, temperature, grad)


def check_ce_args(h, weight, targets, reduction, temperature) -> None:
    assert h.dim() == 2, f"h must be (N, d), got {tuple(h.shape)}"
    assert weight.dim() == 2 and weight.shape[1] == h.shape[1], (
        f"weight must be (V, {h.shape[1]}), got {tuple(weight.shape)}"
    )
    assert targets.shape == (h.shape[0],), f"targets must be ({h.shape[0]},), got {tuple(targets.shape)}"
    assert targets.dtype == torch.long, f"targets must be int64, got {targets.dtype}"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "mean",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    rows=None,
) -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T / temperature`` against targets, chunked over tokens.

    h ``(N, d)`` fp32/bf16; weight ``(V, d)`` same dtype; targets ``(N,)`` int64.
    Returns the mean over non-ignored tokens (0 if none), the sum, or ``(N,)`` fp32 per-token losses.
    ``rows``: the row function (default: the torch reference ``cross_entropy_rows``).
    """
    check_ce_args(h, weight, targets, reduction, temperature)
    valid = targets != ignore_index
    row_fn = ce_row_fn(targets, ignore_index, z_loss, temperature, rows)
    return chunked_linear_loss(h, weight, valid, row_fn, reduction, chunk_size)
