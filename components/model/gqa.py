"""Grouped-query attention (GQA; MHA and MQA are its two ends) with RoPE, and its per-head KV cache.

Shape legend: B batch, T new tokens, S attended positions, D hidden, H query heads, K key/value heads
(H % K == 0; each key/value head serves H / K query heads), Dh head width.

  q = W_q x (+ b_q), k = W_k x (+ b_k), v = W_v x (+ b_v)       per head
  RoPE (kernels.apply_rope, adjacent pairs) on q and k
  o = W_o softmax(q k^T / sqrt(Dh)) v (+ b_o)

RoPE layout. Llama and Qwen2 checkpoints rotate half-vectors (``(x[j], x[j + Dh/2])`` pairs); moeflow's
kernel rotates adjacent pairs. ``hf.py`` permutes the rows of ``q_proj`` and ``k_proj`` (weights and
biases) of each head into the adjacent-pair order on load and back on export -- the permutation of Meta's
original Llama checkpoints -- so q . k, and every logit, is unchanged while the forward needs no copy.

The cache holds the rotated keys and the values of every layer, (B, K, S_max, Dh) each; rows of a ragged
batch are left-padded (RoPE is relative, so left padding does not change what a row attends to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .dense_config import DenseConfig
from .layers import Linear


@dataclass
class KVCache:
    """GQA's KV cache: per layer ``keys[l]``, ``values[l]`` (B, K, S_max, Dh).

    ``valid`` (B, S_max) marks real (non-padding) positions; ``length`` positions are filled. Same protocol
    as MLA's ``LatentCache`` (``select``, ``valid``, ``length``), so ``generate`` drives either.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0
    pos: torch.Tensor | None = None  # static decoding's position (as ``LatentCache.pos``)

    @classmethod
    def allocate(
        cls, cfg: DenseConfig, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        shape = (batch, cfg.kv_heads, max_len, cfg.dim_per_head)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        return cls(keys, values, torch.zeros(batch, max_len, dtype=torch.bool, device=device), 0)

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep (or repeat) batch rows ``rows`` (1-D index tensor): drops finished sequences, expands samples."""
        return KVCache([k.index_select(0, rows) for k in self.keys], [v.index_select(0, rows) for v in self.values],
                       self.valid.index_select(0, rows), self.length)

    def nbytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (= L * 2 * K * Dh * dtype size)."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.keys + self.values)


class GQAttention(nn.Module):
    """Grouped-query attention with transformers' Llama/Qwen2 parameter names (q/k rows in adjacent-pair
    RoPE order, see the module docstring)."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        D, H, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, Dh
        self.scale = cfg.softmax_scale
        self.q_proj = Linear(D, H * Dh, cfg.fp8, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, K * Dh, cfg.fp8, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, K * Dh, cfg.fp8, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * Dh, D, cfg.fp8, bias=cfg.o_bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, D), cos/sin (T, Dh/2) for the new positions -> (B, T, D).

        Without a cache: causal attention over the T tokens. With one: the new keys and values are written
        at ``cache.length`` and the T queries attend to every valid cached position up to their own.
        """
        B, T, _ = x_BTD.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q_BHTd = kernels.apply_rope(self.q_proj(x_BTD).view(B, T, H, Dh).transpose(1, 2), cos, sin)
        k_BKTd = kernels.apply_rope(self.k_proj(x_BTD).view(B, T, K, Dh).transpose(1, 2), cos, sin)
        v_BKTd = self.v_proj(x_BTD).view(B, T, K, Dh).transpose(1, 2)
        mask_B1TS = None
        causal = True
        if cache is not None:
            static = cache.pos is not None  # static decoding: one token at position cache.pos, whole buffer
            L, S = (None, cache.max_len) if static else (cache.length, cache.length + T)
            if static:
                cache.keys[layer].index_copy_(2, cache.pos, k_BKTd)
                cache.values[layer].index_copy_(2, cache.pos, v_BKTd)
            else:
                cache.keys[layer][:, :, L:S] = k_BKTd
                cache.values[layer][:, :, L:S] = v_BKTd
            k_BKTd, v_BKTd = cache.keys[layer][:, :, :S], cache.values[layer][:, :, :S]
            valid_BS = cache.valid[:, :S]
            if static or L > 0 or not bool(valid_BS.all()):
                pos_T = cache.pos if static else torch.arange(L, S, device=x_BTD.device)
                pos_S = torch.arange(S, device=x_BTD.device)
                causal_TS = pos_S[None, :] <= pos_T[:, None]
                # A padding query may see only itself (never an all-masked row); real ones never see padding.
                own_TS = pos_S[None, :] == pos_T[:, None]
                mask_B1TS = (causal_TS[None] & (valid_BS[:, None, :] | own_TS[None]))[:, None]
                causal = False
        o_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BKTd, v_BKTd, attn_mask=mask_B1TS, is_causal=causal, scale=self.scale, enable_gqa=K != H
        )
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, H * Dh))
