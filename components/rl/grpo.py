"""GRPO objective: group-relative advantages and the clipped policy loss with a k3 KL penalty.

Shapes: P prompts, G completions per prompt, B = P*G sequences, T completion tokens.

Per token t of sequence i (advantage A_i shared by all its tokens):
    rho   = exp(logp - old_logp)
    pg    = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    k3    = exp(ref_logp - logp) - (ref_logp - logp) - 1        (>= 0; unbiased KL(pi || ref) estimate)
    loss  = pg + beta * k3                                      (no KL term if beta == 0 or ref_logp is None)
Aggregation over valid tokens (mask):
    "grpo"     mean over each sequence's valid tokens, then mean over the sequences that have any
    "dr_grpo"  sum over all valid tokens / (B * max_len)   (Dr. GRPO; max_len defaults to T)
    "dapo"     sum over all valid tokens / number of valid tokens   (token-level mean)

Truncated completions: the caller masks them out of the loss through `mask` (DAPO's overlong filtering),
e.g. `mask = mask_truncated(mask, truncated)`; this module never looks at lengths itself.

Rows that contribute nothing (zero advantage, no KL term: every sequence of a group whose rewards are all
equal when beta = 0) can be left out of the forward and backward altogether: pass the full batch's
`aggregation_denominator` as `denominator` and the loss and its gradient are the full batch's.
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "dr_grpo", "dapo"]


def group_advantages(rewards_PG: torch.Tensor, scale: Scale = "group", eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean over the group) / (std + eps); float32 (P, G).

    scale: "group" divides by each group's std, "batch" by the std of all P*G rewards, "none" does not
    divide (Dr. GRPO). std is the unbiased (ddof=1) estimate, as in TRL's GRPO. A group whose rewards are
    all equal gets exactly zero advantages: its float32 mean can miss the common value by an ulp (eight
    rewards of 0.1), and dividing that by a std of ~1e-8 + eps would push the whole group by ~0.007.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be (P, G), got shape {tuple(rewards_PG.shape)}")
    r_PG = rewards_PG.to(torch.float32)
    equal_P1 = r_PG.amax(dim=1, keepdim=True) == r_PG.amin(dim=1, keepdim=True)
    centered_PG = (r_PG - r_PG.mean(dim=1, keepdim=True)).masked_fill(equal_P1, 0.0)
    if scale == "none":
        return centered_PG
    if scale == "group":
        if r_PG.shape[1] < 2:
            raise ValueError("scale='group' needs G >= 2 completions per prompt")
        return centered_PG / (r_PG.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        if r_PG.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards")
        return centered_PG / (r_PG.std() + eps)
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


def filter_degenerate_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Keep mask (P,) bool: False for groups whose rewards are all equal (zero advantage, no signal).

    DAPO's dynamic sampling drops these groups and samples more prompts until the batch is full.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be (P, G), got shape {tuple(rewards_PG.shape)}")
    return rewards_PG.amax(dim=1) != rewards_PG.amin(dim=1)


def mask_truncated(mask_BT: torch.Tensor, truncated_B: torch.Tensor) -> torch.Tensor:
    """`mask` with every token of truncated sequences removed (same dtype as `mask`)."""
    if truncated_B.shape != mask_BT.shape[:1]:
        raise ValueError(f"truncated must be ({mask_BT.shape[0]},), got shape {tuple(truncated_B.shape)}")
    keep_B1 = ~truncated_B.to(torch.bool).unsqueeze(1)
    if mask_BT.dtype == torch.bool:
        return mask_BT & keep_B1
    return mask_BT * keep_B1.to(mask_BT.dtype)


def aggregation_denominator(mask: torch.Tensor, aggregation: Aggregation = "grpo", max_len: int | None = None) -> float:
    """What `grpo_loss` divides the summed per-token terms by, for the (B, T) `mask`: the number of sequences
    with a valid token ("grpo"), B * max_len ("dr_grpo", max_len defaulting to T) or the number of valid
    tokens ("dapo"); at least 1."""
    B, T = mask.shape
    if aggregation == "grpo":
        n = float((mask.to(torch.float32).sum(dim=1) > 0).sum())
    elif aggregation == "dr_grpo":
        n = float(B * (T if max_len is None else max_len))
    elif aggregation == "dapo":
        n = float(mask.to(torch.float32).sum())
    else:
        raise ValueError(f"aggregation must be 'grpo', 'dr_grpo' or 'dapo', got {aggregation!r}")
    return max(n, 1.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    max_len: int | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO loss (scalar, float32, differentiable in `logp`) and detached statistics.

    logp, old_logp, ref_logp: (B, T) per-token log-probs of the sampled tokens under the current,
        sampling and reference policies (old/ref carry no gradient). advantages: (B,). mask: (B, T) bool or
        float, 1 for completion tokens that count. denominator: the `aggregation_denominator` of a larger
        batch these rows are part of (the rows left out must contribute nothing); None: of these rows.
    stats: "ratio_mean", "ratio_max" (over valid tokens), "clip_fraction" (valid tokens where the clip is
        active, i.e. the gradient is cut: rho < 1-eps_low with A < 0 or rho > 1+eps_high with A > 0),
        "clip_low_fraction", "clip_high_fraction", "pg_loss" (the loss without the KL term), "n_tokens",
        and "kl" (token mean of k3) when ref_logp is given.
    """
    B, T = logp.shape
    for name, tensor in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if tensor is not None and tensor.shape != (B, T):
            raise ValueError(f"{name} must have logp's shape {(B, T)}, got {tuple(tensor.shape)}")
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be ({B},), got {tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")

    logp_BT = logp.to(torch.float32)
    mask_BT = mask.to(torch.float32)
    adv_B1 = advantages.detach().to(torch.float32).unsqueeze(1)
    ratio_BT = torch.exp(logp_BT - old_logp.detach().to(torch.float32))
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_BT = -torch.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    per_token_BT = pg_BT
    kl_BT = None
    if ref_logp is not None:
        log_ref_ratio_BT = ref_logp.detach().to(torch.float32) - logp_BT
        kl_BT = torch.exp(log_ref_ratio_BT) - log_ref_ratio_BT - 1.0
        if beta != 0.0:
            per_token_BT = pg_BT + beta * kl_BT

    denom = aggregation_denominator(mask_BT, aggregation, max_len)  # also rejects an unknown aggregation
    if denominator is not None:
        denom = denominator
    if denom <= 0:
        raise ValueError(f"denominator must be > 0, got {denom}")

    def aggregate(values_BT: torch.Tensor) -> torch.Tensor:
        masked_BT = values_BT * mask_BT
        if aggregation == "grpo":  # each sequence's token mean (empty sequences add 0)
            return (masked_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1.0)).sum() / denom
        return masked_BT.sum() / denom  # dr_grpo, dapo

    loss = aggregate(per_token_BT)

    with torch.no_grad():
        valid_BT = mask_BT > 0
        n_tokens = int(valid_BT.sum())
        low_BT = (ratio_BT < 1.0 - eps_low) & (adv_B1 < 0) & valid_BT
        high_BT = (ratio_BT > 1.0 + eps_high) & (adv_B1 > 0) & valid_BT
        denom = max(n_tokens, 1)
        stats = {
            "pg_loss": aggregate(pg_BT).item(),
            "ratio_mean": (ratio_BT * valid_BT).sum().item() / denom,
            "ratio_max": ratio_BT[valid_BT].max().item() if n_tokens else 1.0,
            "clip_low_fraction": low_BT.sum().item() / denom,
            "clip_high_fraction": high_BT.sum().item() / denom,
            "clip_fraction": (low_BT | high_BT).sum().item() / denom,
            "n_tokens": float(n_tokens),
        }
        if kl_BT is not None:
            stats["kl"] = (kl_BT * valid_BT).sum().item() / denom
    return loss, stats
