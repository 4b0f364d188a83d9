"""Model arithmetic from the config alone (no weights allocated): parameters, FLOPs, KV-cache bytes.

Counting rules (they match ``sum(p.numel())`` of the built model; a test checks it):
- ``total_params``: embedding, every trunk layer, final norm, output head (absent when tied). The MTP
  modules are reported apart (``mtp_params``) -- DeepSeek-V3's 671B excludes its 14B MTP module. The
  balancing biases are buffers, not parameters.
- ``active_params``: what one token touches: everything in ``total_params`` except that each MoE layer
  contributes only its K routed experts (plus router and shared experts). The embedding table counts
  (as in DeepSeek's 37B).
- ``flops_per_token`` (training, forward + backward): ``6 * matmul_params_active + attention term``,
  where ``matmul_params_active`` is ``active_params`` minus the embedding table (a lookup, not a GEMM)
  minus the norm weights, and the attention term is ``3 * L * 2 * H * (Dq + Dv) * ctx``: the score and
  value GEMMs (2 FLOPs per multiply-add, forward; backward twice that) with ``ctx = (seq_len + 1) / 2``,
  the mean causal context length. Dropping the causal halving (PaLM's 12 L H Q T) would overstate MFU.
  ``flops_per_token_with_mtp`` adds the MTP modules (each a block + ``eh_proj`` + the shared head).
- ``kv_cache_bytes_per_token``: MLA caches ``L * (R + Dr)`` values per token, against
  ``L * H * (Dq + Dv)`` for the naive per-head keys and values (``kv_cache_bytes_per_token_mha``).
- Dense families (Llama, Qwen2; ``DenseConfig``): the same keys; every parameter is active, no MTP, and
  GQA caches ``L * 2 * K * Dh`` values per token (K key/value heads of width Dh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ModelConfig
from .dense_config import DenseConfig


def _attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    R, Dr, Dn, Dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv = D * (R + Dr) + R + R * H * (Dn + Dv)
    return q + kv + H * Dv * D


def _norm_params_per_block(cfg: ModelConfig) -> int:
    n = 2 * cfg.hidden_size + cfg.kv_lora_rank
    return n + (cfg.q_lora_rank or 0)


def _moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one MoE layer (router + routed + shared experts)."""
    D, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    expert = 3 * D * I
    router = E * D
    shared = cfg.n_shared_experts * expert
    return router + E * expert + shared, router + cfg.num_experts_per_tok * expert + shared


def model_info(cfg: ModelConfig | DenseConfig, *, seq_len: int | None = None, dtype_bytes: int = 2) -> dict[str, Any]:
    """Parameters, FLOPs per token and KV-cache size of ``cfg``; see the module docstring for the rules.

    seq_len: training sequence length for the attention FLOPs (default min(4096, max_position_embeddings)).
    dtype_bytes: bytes per cached value (2 for bf16).
    """
    seq_len = seq_len or min(4096, cfg.max_position_embeddings)
    if isinstance(cfg, DenseConfig):
        return _dense_info(cfg, seq_len, dtype_bytes)
    D, V, L, H = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads
    attn = _attention_params(cfg)
    norms = _norm_params_per_block(cfg)  # includes the two latent norms inside attention
    attn_no_latent_norms = attn - cfg.kv_lora_rank - (cfg.q_lora_rank or 0)
    dense_mlp = 3 * D * cfg.intermediate_size
    moe_total, moe_active = _moe_params(cfg)
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.n_moe_layers
    block_base = attn_no_latent_norms + norms
    embed, head = V * D, (0 if cfg.tie_word_embeddings else V * D)

    total = embed + head + D + n_dense * (block_base + dense_mlp) + n_moe * (block_base + moe_total)
    active = embed + head + D + n_dense * (block_base + dense_mlp) + n_moe * (block_base + moe_active)
    mtp_module = block_base + moe_total + 2 * D * D + 3 * D  # block + eh_proj + enorm, hnorm, head norm
    mtp_module_active = block_base + moe_active + 2 * D * D + 3 * D

    # GEMM parameters per token: the output head (always a GEMM, tied or not) but not the lookup table.
    norm_weights = L * norms + D
    matmul_active = active - embed - norm_weights + (V * D if cfg.tie_word_embeddings else 0)
    ctx = (seq_len + 1) / 2
    attn_fwd_per_layer = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
    flops_train = 6 * matmul_active + 3 * L * attn_fwd_per_layer
    mtp_matmul = mtp_module_active - (norms + 3 * D) + V * D
    mtp_flops = cfg.mtp_depth * (6 * mtp_matmul + 3 * attn_fwd_per_layer)

    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return {
        "total_params": total,
        "active_params": active,
        "embedding_params": embed,
        "mtp_params": cfg.mtp_depth * mtp_module,
        "layers": L,
        "dense_layers": n_dense,
        "moe_layers": n_moe,
        "seq_len": seq_len,
        "flops_per_token": flops_train,
        "flops_per_token_with_mtp": flops_train + mtp_flops,
        "inference_flops_per_token": 2 * matmul_active + L * attn_fwd_per_layer,
        "kv_cache_values_per_token": L * latent,
        "kv_cache_bytes_per_token": L * latent * dtype_bytes,
        "kv_cache_bytes_per_token_mha": L * H * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes,
        "dtype_bytes": dtype_bytes,
    }


def _dense_info(cfg: DenseConfig, seq_len: int, dtype_bytes: int) -> dict[str, Any]:
    """``model_info`` of a dense family (Llama, Qwen2): the same keys and rules, every parameter active,
    a GQA cache of ``L * 2 * K * Dh`` values per token."""
    D, V, L, H, K, Dh = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                         cfg.kv_heads, cfg.dim_per_head)
    attn = D * (H + 2 * K) * Dh + H * Dh * D + (H + 2 * K) * Dh * cfg.qkv_bias + D * cfg.o_bias
    block = attn + 3 * D * cfg.intermediate_size + 2 * D
    embed, head = V * D, (0 if cfg.tie_word_embeddings else V * D)
    total = embed + head + D + L * block
    matmul = total - embed - (2 * L + 1) * D + (V * D if cfg.tie_word_embeddings else 0)
    attn_fwd_per_layer = 2 * H * 2 * Dh * (seq_len + 1) / 2
    flops_train = 6 * matmul + 3 * L * attn_fwd_per_layer
    kv = L * 2 * K * Dh
    return {
        "total_params": total,
        "active_params": total,
        "embedding_params": embed,
        "mtp_params": 0,
        "layers": L,
        "dense_layers": L,
        "moe_layers": 0,
        "seq_len": seq_len,
        "flops_per_token": flops_train,
        "flops_per_token_with_mtp": flops_train,
        "inference_flops_per_token": 2 * matmul + L * attn_fwd_per_layer,
        "kv_cache_values_per_token": kv,
        "kv_cache_bytes_per_token": kv * dtype_bytes,
        "kv_cache_bytes_per_token_mha": L * 2 * H * Dh * dtype_bytes,
        "dtype_bytes": dtype_bytes,
    }


def model_info_from_file(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """``model_info`` of a YAML preset (``moeflow model info --config FILE``)."""
    from .dense_config import config_from_yaml

    return model_info(config_from_yaml(path), **kwargs)


def format_info(info: dict[str, Any]) -> str:
    """Human-readable summary for ``moeflow model info``."""

    def big(n: float) -> str:
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(n) >= div:
                return f"{n / div:.2f}{unit}"
        return f"{n:.0f}"

    return "\n".join(
        [
            f"total parameters        {big(info['total_params'])} ({info['total_params']:,})",
            f"active per token        {big(info['active_params'])} ({info['active_params']:,})",
            f"MTP modules             {big(info['mtp_params'])}",
            f"layers                  {info['layers']} ({info['dense_layers']} dense, {info['moe_layers']} MoE)",
            f"training FLOPs/token    {big(info['flops_per_token'])} at seq_len {info['seq_len']}"
            f" ({big(info['flops_per_token_with_mtp'])} with MTP)",
            f"inference FLOPs/token   {big(info['inference_flops_per_token'])}",
            f"KV cache per token      {info['kv_cache_bytes_per_token'] / 1024:.1f} KiB "
            f"({info['kv_cache_values_per_token']} values x {info['dtype_bytes']} B; per-head K/V would be "
            f"{info['kv_cache_bytes_per_token_mha'] / 1024:.1f} KiB)",
        ]
    )
