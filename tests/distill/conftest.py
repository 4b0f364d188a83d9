"""Fixtures of the distillation tests: a small BPE tokenizer, arithmetic problems and very small models."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def config_of():
    """small_config(**overrides) -> a very small ModelConfig (2 dense layers unless overridden)."""
    return small_config


@pytest.fixture
def make_model(tok):
    def make(seed: int = 0, **over) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(small_config(**{"vocab_size": tok.get_vocab_size(), **over}))

    return make


@pytest.fixture
def publish_model(tok, tmp_path):
    """publish(model, name) -> URI of the model published in the store (save_model layout + tokenizer)."""
    from components.data.tokenizer import save_tokenizer
    from components.training.checkpoint import save_model
    from infra import storage
    from infra.settings import get_settings

    tok_dir = tmp_path / "tokenizer"
    save_tokenizer(tok, tok_dir, model_max_length=256)

    def publish(model, name: str) -> str:
        local = save_model(model, model.cfg, tmp_path / name, tok_dir)
        uri = storage.join_uri(get_settings().store_uri, "test", tmp_path.name, name, "model")
        storage.publish_dir(local, uri, meta={"kind": "model"})
        return uri

    return publish


@pytest.fixture(scope="module")
def distill_home(tmp_path_factory):
    """One MOEFLOW_HOME (store + MLflow SQLite) for a whole test module: creating MLflow's database costs
    seconds, so the stage tests share one (each uses its own model names and store paths)."""
    from infra.settings import get_settings
    from infra.storage import reset_clients

    home = tmp_path_factory.mktemp("distill-home")
    saved = {k: os.environ.get(k) for k in ("MOEFLOW_HOME", "MOEFLOW_STORE_URI")}
    os.environ["MOEFLOW_HOME"] = str(home)
    os.environ.pop("MOEFLOW_STORE_URI", None)
    get_settings.cache_clear()
    reset_clients()
    yield str(home)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()
    reset_clients()
