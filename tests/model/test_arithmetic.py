"""Model arithmetic: DeepSeek-V3's 671B / 37B, parameter counts equal to the built model, FLOPs equal to
what torch's FlopCounterMode measures, and the latent KV-cache size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from components.model import ModelConfig, Transformer, format_info, model_info

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def test_deepseek_v3_is_671b_total_37b_active_without_allocating():
    cfg = ModelConfig.from_yaml(PRESETS / "deepseek-v3.yaml")
    info = model_info(cfg)
    assert info["total_params"] == pytest.approx(671e9, rel=0.005)
    assert info["active_params"] == pytest.approx(37e9, rel=0.03)
    assert 10e9 < info["mtp_params"] < 14e9  # the report's 14B MTP module includes its embedding/head copies
    # 61 layers x (512 + 64) values x 2 bytes = 70,272 bytes = the notes' 70.3 KB per token
    assert info["kv_cache_bytes_per_token"] == 61 * 576 * 2
    assert "671.03B" in format_info(info)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(q_lora_rank=None, tie_word_embeddings=True, first_k_dense_replace=0, mtp_depth=2),
     dict(n_shared_experts=0, mtp_depth=1)],
)
def test_param_counts_equal_the_built_model(kit, overrides):
    cfg = kit.cfg(**overrides)
    model = Transformer(cfg)
    info = model_info(cfg)
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert info["total_params"] == trunk and info["mtp_params"] == mtp
    unused_experts = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert info["active_params"] == trunk - cfg.n_moe_layers * unused_experts
    assert model.param_counts() == {"total": trunk, "active": info["active_params"], "mtp": mtp}


@pytest.mark.parametrize("tied", [False, True])
def test_training_flops_equal_measured_gemm_flops(kit, tied):
    """FlopCounterMode on forward + backward (per-expert loop, so only routed experts' GEMMs run).

    GEMMs (aten.mm) must equal the formula's 6 * matmul params per token; the attention GEMMs (bmm, counted
    without causal masking by FlopCounterMode) equal our attention term with ctx = T instead of (T+1)/2.
    """
    cfg = kit.cfg(tie_word_embeddings=tied)
    model = Transformer(cfg).train()
    model.set_moe_impl("loop")
    B, T = 2, 16
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (B, T))).sum().backward()
    measured = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    info = model_info(cfg, seq_len=T)
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    attn_causal = 3 * L * 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * (T + 1) / 2
    assert measured["aten.mm"] == pytest.approx(B * T * (info["flops_per_token"] - attn_causal), rel=1e-9)
    assert measured["aten.bmm"] == pytest.approx(B * T * attn_causal * T / ((T + 1) / 2), rel=1e-9)


def test_kv_cache_is_much_smaller_than_per_head_keys_and_values():
    cfg = ModelConfig.from_yaml(PRESETS / "deepseek-v3.yaml")
    info = model_info(cfg, dtype_bytes=2)
    assert info["kv_cache_bytes_per_token_mha"] / info["kv_cache_bytes_per_token"] > 50
