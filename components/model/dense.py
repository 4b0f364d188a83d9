"""The dense decoder families (Llama, Qwen2): one block, one model, on moeflow's kernels.

  h = Emb(ids);  per block:  h = h + GQA(RMSNorm(h));  h = h + MLP(RMSNorm(h))
  logits = RMSNorm(h) W_out^T      (W_out = the embedding matrix when tied)

The attention is ``gqa.GQAttention`` (RoPE on adjacent pairs, q/k rows permuted at the HF boundary), the
MLP is ``layers.MLP`` (SwiGLU), the norms ``layers.RMSNorm`` and the loss the fused linear cross-entropy
of ``CausalLM``. Parameter names follow transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` without
the ``model.`` prefix (``embed_tokens``, ``layers.L.self_attn.q_proj`` ..., ``norm``, ``lm_head``); with
tied embeddings there is no ``lm_head`` parameter. The interface is ``CausalLM``'s, the one every stage
uses for DeepSeek-V3 (``forward``, ``compute_loss``, ``hidden_states``, ``output_weight``,
``forward_cached`` + ``allocate_cache`` for ``generate``), plus empty expert bookkeeping.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels

from .dense_config import DenseConfig
from .gqa import GQAttention, KVCache
from .layers import MLP, RMSNorm
from .model import CausalLM


def rope_inv_freq(cfg: DenseConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim // 2,) fp32, attention factor) of the config's RoPE, as transformers computes
    them: plain, Llama 3.1's frequency scaling (``llama3``), or YaRN (``kernels.rope_inv_freq``)."""
    if cfg.rope_type == "yarn":
        return kernels.rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    inv_freq, factor = kernels.rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, None)
    if cfg.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, cfg.rope_scaling)
    return inv_freq, factor


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """transformers' ``_compute_llama3_parameters``: wavelengths above ``original / low_freq_factor`` are
    divided by ``factor``, those below ``original / high_freq_factor`` kept, the band between blended."""
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class DecoderBlock(nn.Module):
    """Pre-norm block of the dense families: GQA attention, then the SwiGLU MLP."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GQAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fp8=cfg.fp8)

    def forward(self, x_BTD, cos, sin, cache: KVCache | None = None, layer: int = 0):
        """-> (x_BTD, None): no auxiliary loss."""
        attn_BTD = self.self_attn(self.input_layernorm(x_BTD), cos, sin, cache, layer)
        y_BTD, x_BTD = self.post_attention_layernorm(attn_BTD, residual=x_BTD)  # x <- x + attn
        return x_BTD + self.mlp(y_BTD), None


class DenseForCausalLM(CausalLM):
    """A Llama- or Qwen2-architecture causal LM (the config's class picks the family)."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kernel_backend != "auto":
            kernels.set_backend(cfg.kernel_backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def _rope_table(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, factor = rope_inv_freq(self.cfg)
        freqs = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq.to(device)[None, :]
        return freqs.cos() * factor, freqs.sin() * factor

    def allocate_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return KVCache.allocate(self.cfg, batch, max_len, dtype=dtype, device=device)

    # --- the expert bookkeeping stages call on any model: nothing to count -------------------------------
    def moe_layers(self) -> list:
        return []

    def set_moe_impl(self, impl: str) -> None:
        if impl not in ("kernel", "loop"):
            raise ValueError(f"moe impl must be 'kernel' or 'loop', got {impl!r}")

    def expert_counts(self) -> torch.Tensor:
        return torch.zeros(0, 0, dtype=torch.int64)

    def update_expert_bias(self, counts: torch.Tensor | None = None) -> None:
        if counts is not None and counts.numel():
            raise ValueError(f"a dense model has no experts; got counts of shape {tuple(counts.shape)}")

    def reset_expert_counts(self) -> None:
        pass

    def param_counts(self) -> dict[str, int]:
        from .arithmetic import model_info

        info = model_info(self.cfg)
        return {"total": info["total_params"], "active": info["active_params"], "mtp": 0}


LlamaForCausalLM = DenseForCausalLM
Qwen2ForCausalLM = DenseForCausalLM
