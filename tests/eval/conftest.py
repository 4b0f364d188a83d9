"""Fixtures of the evaluation tests: a small BPE tokenizer, arithmetic problems and a very small model."""

from __future__ import annotations

import pytest
import torch

from components.data.config import TokenizerConfig
from components.data.tokenizer import train_tokenizer
from components.model import ModelConfig, Transformer
from components.tasks import make_split


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine extra threads cost 10x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def problems():
    return make_split("arithmetic", 120, 0)


@pytest.fixture(scope="session")
def tok(problems):
    return train_tokenizer([p.prompt + p.completion() for p in problems], TokenizerConfig(vocab_size=300))


@pytest.fixture(scope="session")
def examples(problems):
    return [{"prompt": p.prompt, "completion": p.completion()} for p in problems]


def small_config(**over) -> ModelConfig:
    base = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return ModelConfig(**{**base, **over})


@pytest.fixture
def make_model(tok):
    def make(seed: int = 0, **over) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(small_config(**{"vocab_size": tok.get_vocab_size(), **over}))

    return make
