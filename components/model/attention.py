"""Multi-head latent attention (MLA) and its compressed-latent KV cache.

Shape legend: B batch, T new tokens, S attended positions (cache length), D hidden, H heads,
Dn = qk_nope_head_dim, Dr = qk_rope_head_dim, Dq = Dn + Dr, Dv = v_head_dim, R = kv_lora_rank,
Rq = q_lora_rank.

Training / prefill (the "naive" form, one SDPA call):
  q = W_qb RMSNorm(W_qa x)            (or q_proj x)         -> per head [q_nope (Dn) | q_rot (Dr)]
  [c_kv | k_rot] = W_kva x;  c = RMSNorm(c_kv)              -> k_rot: one head shared by all heads
  [k_nope | v] = W_kvb c                                     -> per head
  RoPE (adjacent pairs, kernels.apply_rope) on q_rot and k_rot only
  o = softmax(q k^T * scale) v,  scale = Dq^-0.5 * mscale^2 (YaRN)

Decoding (the "absorbed" form): only ``[c | k_rot]`` (R + Dr values per token per layer) is cached. With
W_kvb split per head into W_uk (Dn, R) and W_uv (Dv, R):
  q_nope . k_nope = (W_uk^T q_nope) . c       -> scores = [W_uk^T q_nope | q_rot] . [c | k_rot]
  o = W_uv (sum_s p_s c_s)
so each step is two batched GEMMs against the latent cache, never re-expanding past keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig
from .layers import Linear, RMSNorm

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use 1e-6 whatever rms_norm_eps is (as HF, DeepSeek)


@dataclass
class LatentCache:
    """MLA's KV cache: per layer ``latents[l]`` (B, S_max, R + Dr) = [RMSNorm(c_kv) | RoPE(k_rot)].

    ``valid`` (B, S_max) marks real (non-padding) positions; ``length`` positions are filled. Rows of a
    ragged batch are left-padded so that new tokens share one position index (RoPE is relative, so
    left padding does not change what a row attends to).
    """

    latents: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0
    # Static decoding (``CausalLM.decode_step``): the new token's position as a (1,) int64 tensor; each
    # step writes there and attends over the whole buffer under a mask, so no shape depends on the length.
    pos: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> LatentCache:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        latents = [torch.zeros(batch, max_len, width, dtype=dtype, device=device)
                   for _ in range(cfg.num_hidden_layers)]
        return cls(latents, torch.zeros(batch, max_len, dtype=torch.bool, device=device), 0)

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> LatentCache:
        """Keep (or repeat) batch rows ``rows`` (1-D index tensor): drops finished sequences, expands samples."""
        return LatentCache([lat.index_select(0, rows) for lat in self.latents], self.valid.index_select(0, rows),
                           self.length)

    def nbytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (= L * (R + Dr) * dtype size)."""
        return sum(lat.shape[-1] * lat.element_size() for lat in self.latents)


class MLAttention(nn.Module):
    """Multi-head latent attention with HF DeepseekV3Attention's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.rank = H, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        fp8 = cfg.fp8
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, fp8)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, fp8)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, fp8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.dn + self.dv), fp8)
        self.o_proj = Linear(H * self.dv, D, fp8)

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        return q.view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)  # B H T Dq

    def _latent(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x -> (c (B, T, R) normalised latent, k_rot (B, T, Dr) rotated shared key)."""
        c_BTR, k_rot_BTr = self.kv_a_proj_with_mqa(x_BTD).split([self.rank, self.dr], dim=-1)
        return self.kv_a_layernorm(c_BTR), kernels.apply_rope(k_rot_BTr, cos, sin)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, D), cos/sin (T, Dr/2) for the new positions -> (B, T, D).

        Without a cache: causal attention over the T tokens. With one: the latents of the new tokens are
        written at ``cache.length``; a first call (length 0) attends in the naive form (prefill), later
        calls in the absorbed form against the whole cache.
        """
        B, T, _ = x_BTD.shape
        q_BHTQ = self._query(x_BTD)
        q_nope_BHTn, q_rot_BHTr = q_BHTQ.split([self.dn, self.dr], dim=-1)
        q_rot_BHTr = kernels.apply_rope(q_rot_BHTr, cos, sin)
        c_BTR, k_rot_BTr = self._latent(x_BTD, cos, sin)

        if cache is not None and cache.pos is not None:  # static decoding: one token at position cache.pos
            cache.latents[layer].index_copy_(1, cache.pos, torch.cat([c_BTR, k_rot_BTr], dim=-1))
            return self._absorbed(q_nope_BHTn, q_rot_BHTr, cache, layer, cache.max_len, cache.pos)
        if cache is not None:
            L = cache.length
            cache.latents[layer][:, L:L + T] = torch.cat([c_BTR, k_rot_BTr], dim=-1)
            if L > 0:
                pos_T = torch.arange(L, L + T, device=x_BTD.device)
                return self._absorbed(q_nope_BHTn, q_rot_BHTr, cache, layer, L + T, pos_T)
            valid_BT = cache.valid[:, :T]
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
            # A padding query may see only itself (never an all-masked row); real queries never see padding.
            mask = causal_TT & (valid_BT[:, None, :] | torch.eye(T, dtype=torch.bool, device=x_BTD.device))
            mask_B1TT = None if bool(valid_BT.all()) else mask[:, None]
        else:
            mask_B1TT = None

        kv_BTHe = self.kv_b_proj(c_BTR).view(B, T, self.n_heads, self.dn + self.dv)
        k_nope_BHTn, v_BHTv = kv_BTHe.transpose(1, 2).split([self.dn, self.dv], dim=-1)
        k_BHTQ = torch.cat([k_nope_BHTn, k_rot_BTr[:, None].expand(B, self.n_heads, T, self.dr)], dim=-1)
        q_BHTQ = torch.cat([q_nope_BHTn, q_rot_BHTr], dim=-1)
        o_BHTv = F.scaled_dot_product_attention(
            q_BHTQ, k_BHTQ, v_BHTv, attn_mask=mask_B1TT, is_causal=mask_B1TT is None, scale=self.scale
        )
        return self.o_proj(o_BHTv.transpose(1, 2).reshape(B, T, self.n_heads * self.dv))

    def _absorbed(
        self, q_nope_BHTn: torch.Tensor, q_rot_BHTr: torch.Tensor, cache: LatentCache, layer: int, S: int,
        pos_T: torch.Tensor,
    ) -> torch.Tensor:
        """The T queries (at positions pos_T) against the first S cached latents."""
        B, H, T, _ = q_nope_BHTn.shape
        w_HeR = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.rank)
        w_uk_HnR, w_uv_HvR = w_HeR.split([self.dn, self.dv], dim=1)
        q_lat_BHTR = torch.einsum("bhtn,hnr->bhtr", q_nope_BHTn, w_uk_HnR)
        q_BMW = torch.cat([q_lat_BHTR, q_rot_BHTr], dim=-1).flatten(1, 2)  # M = H*T queries, W = R + Dr
        lat_BSW = cache.latents[layer][:, :S]
        scores_BHTS = torch.bmm(q_BMW, lat_BSW.transpose(1, 2)).view(B, H, T, S).float() * self.scale
        allowed_BTS = cache.valid[:, None, :S] & (torch.arange(S, device=pos_T.device)[None, :] <= pos_T[:, None])
        scores_BHTS = scores_BHTS.masked_fill(~allowed_BTS[:, None], float("-inf"))
        p_BMS = scores_BHTS.softmax(-1).to(lat_BSW.dtype).flatten(1, 2)
        o_lat_BHTR = torch.bmm(p_BMS, lat_BSW[..., : self.rank]).view(B, H, T, self.rank)
        o_BTHv = torch.einsum("bhtr,hvr->bthv", o_lat_BHTR, w_uv_HvR)
        return self.o_proj(o_BTHv.reshape(B, T, H * self.dv))
