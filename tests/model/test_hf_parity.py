"""moeflow's model against the installed transformers DeepseekV3ForCausalLM: same weights, same logits.

(dtype, atol): fp32, 1e-5 on logits; fp32, 1e-5 relative to the largest entry on every gradient.
Both directions: our export loaded by transformers, and transformers' save_pretrained loaded by us.
"""

from __future__ import annotations

import pytest
import torch

from components.model import Transformer, load_pretrained
from components.model.hf import hf_counterpart

ATOL = 1e-5

CONFIGS = {
    # q low-rank, 2 groups (keep 1), 2 shared experts, 1 dense layer, normalised gate weights.
    "qlora-groups-dense1": dict(),
    # full-rank q_proj, no groups, 1 shared expert, no dense layer, raw gate weights, tied head.
    "qfull-nogroups-dense0-tied": dict(
        q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
        norm_topk_prob=False, tie_word_embeddings=True,
    ),
    # 4 groups of 2 (keep 2), 3 shared experts, 2 dense layers.
    "four-groups-dense2": dict(n_group=4, topk_group=2, n_shared_experts=3, first_k_dense_replace=2),
    # YaRN rope scaling: the softmax scale carries mscale**2, cos/sin the attention factor.
    "yarn": dict(
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        max_position_embeddings=64,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_loading_our_export(name, kit, hf_twin):
    torch.manual_seed(0)
    model = Transformer(kit.cfg(**CONFIGS[name])).eval()
    kit.randomize_biases(model, std=0.1)
    hf, _ = hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, 37, model.cfg.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_negative_bias_masks_discarded_groups_like_transformers(kit, hf_twin):
    """s + b < 0 everywhere: a 0.0 fill of discarded groups would pick them; -inf (HF 5.24) never does."""
    torch.manual_seed(1)
    model = Transformer(kit.cfg(n_group=4, topk_group=2, first_k_dense_replace=0)).eval()
    kit.randomize_biases(model, std=0.3, mean=-2.0)
    hf, _ = hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)
    # and the chosen experts really stay inside topk_group groups
    x = torch.randn(64, model.cfg.hidden_size)
    idx, _, _ = model.layers[0].mlp.gate(x)
    groups = idx // (model.cfg.n_routed_experts // model.cfg.n_group)
    assert all(len(set(row.tolist())) <= model.cfg.topk_group for row in groups)


@pytest.mark.parametrize("name", ["qlora-groups-dense1", "qfull-nogroups-dense0-tied"])
def test_load_pretrained_reads_transformers_save_pretrained(name, kit, tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(2)
    cfg = kit.cfg(**CONFIGS[name])
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf_dict())).eval()
    with torch.no_grad():  # HF initialises the bias to zero; make it matter
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_loss_and_every_gradient_match_transformers(kit, hf_twin):
    torch.manual_seed(3)
    model = Transformer(kit.cfg()).train()
    kit.randomize_biases(model, std=0.1)
    hf, _ = hf_twin(model)
    hf.train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 19))
    out, hf_loss = kit.train_both(model, hf, ids, n_ignored=5)
    torch.testing.assert_close(out.loss, hf_loss, atol=ATOL, rtol=0)

    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    seen = set()
    for name, p in model.named_parameters():
        hf_name, ref = hf_counterpart(name, hf_grads)
        assert p.grad is not None, name
        scale = ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(p.grad / scale, ref / scale, atol=ATOL, rtol=0, msg=name)
        seen.add(hf_name)
    assert seen == set(hf_grads)  # every transformers parameter was compared
