"""Fixtures for the model tests: small configs, and building a transformers twin with the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from components.model import ModelConfig, Transformer, export_hf

# Small but complete: q low-rank, two expert groups of four, two shared experts, one dense layer.
BASE = dict(
    vocab_size=101, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=3, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6,
    v_head_dim=10, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=2, topk_group=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=96, initializer_range=0.1,
)


def small_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def randomize_biases(model: Transformer, std: float = 0.1, mean: float = 0.0) -> None:
    """Give every balancing bias random values so that selection and gate weights can disagree."""
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(mean, std)


def train_both(model, hf, ids: torch.Tensor, n_ignored: int):
    """One training forward and backward of ours and of its transformers twin on the same tokens, the first
    `n_ignored` targets of row 0 ignored (transformers shifts its labels, ours come shifted); -> (our
    LossOutput, transformers' loss)."""
    hf_labels = ids.clone()
    hf_labels[0, :n_ignored] = -100
    labels = torch.cat([hf_labels[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)
    out = model.compute_loss(ids, labels)
    out.loss.backward()
    hf_loss = hf(ids, labels=hf_labels).loss
    hf_loss.backward()
    return out, hf_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP hand-off costs that dominate them
    (and that explode on a shared, oversubscribed machine). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kit():
    """Helpers the tests share: ``kit.cfg(**overrides)``, ``kit.randomize_biases(model, std, mean)``,
    ``kit.train_both(model, hf, ids, n_ignored)``."""
    return SimpleNamespace(cfg=small_cfg, randomize_biases=randomize_biases, train_both=train_both)


@pytest.fixture
def hf_twin(tmp_path):
    """``hf_twin(model) -> transformers.DeepseekV3ForCausalLM`` loaded from our export (fp32, eval)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    counter = iter(range(1000))

    def make(model: Transformer):
        out = tmp_path / f"export{next(counter)}"
        export_hf(model, out)
        return DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out

    return make
