"""Torch reference for rotary position embedding in DeepSeek's interleaved layout, and its cos/sin tables.

Layout. DeepSeek rotates ADJACENT pairs ``(x[2i], x[2i+1])`` by the angle ``t * inv_freq[i]``. Hugging
Face's DeepSeek-V3 with ``rope_interleave=True`` (its default) applies the same rotation to the raw
checkpoint weights but returns the result de-interleaved (``[all even | all odd]``). Queries and keys are
permuted the same way, so ``q . k`` -- and therefore the logits -- are identical; moeflow keeps the output
interleaved, like DeepSeek's own ``apply_rotary_emb``.

Tables. ``rope_cos_sin`` reproduces transformers' ``_compute_yarn_parameters`` (modeling_rope_utils) for
``rope_type``/``type`` ``"yarn"`` -- the blended inv_freq and the ``attention_factor`` that HF multiplies
into cos and sin. The softmax-scale correction ``mscale**2`` (``yarn_get_mscale(factor, mscale_all_dim)``)
is the attention module's business, not this table's.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim.

    x: ``(..., T, D)`` fp32/bf16, D even; cos, sin: ``(T, D // 2)`` fp32.
    ``out[..., 2i] = x[2i] cos_i - x[2i+1] sin_i``, ``out[..., 2i+1] = x[2i+1] cos_i + x[2i] sin_i``,
    computed in fp32, returned in x.dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq (dim // 2,) fp32, attention_factor)`` exactly as transformers computes them.

    scaling: None / ``{"rope_type": "default"}`` for plain RoPE, or a YaRN dict with ``factor``,
    ``original_max_position_embeddings`` and optionally ``beta_fast`` (32), ``beta_slow`` (1), ``mscale``,
    ``mscale_all_dim``, ``attention_factor``, ``truncate`` (True).
    """
    assert dim % 2 == 0, f"rope dim must be even, got {dim}"
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; use 'yarn' or none")
    if scaling.get("factor") is None or scaling.get("original_max_position_embeddings") is None:
        raise ValueError("yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    factor = float(scaling["factor"])
    orig_max = scaling["original_max_position_embeddings"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation = 1 - ramp  # share of the unscaled frequency per pair
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor,
    dim: int,
    theta: float,
    device: torch.device | str | None = None,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``(T, dim // 2)`` fp32 for integer ``positions (T,)``, times HF's attention_factor."""
    inv_freq, attention_factor = rope_inv_freq(dim, theta, scaling)
    device = positions.device if device is None else torch.device(device)
    freqs = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq.to(device)[None, :]
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor
