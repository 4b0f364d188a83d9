"""Fixtures of the release tests: a small BPE tokenizer, tiny random models (MoE and all-dense) published
in the store the way pretraining publishes them (model directory + RESULT.json with the efficiency ledger,
and a dataset upstream), and an evaluation report."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from components.model import ModelConfig, Transformer
from infra import storage

PRETRAIN_METRICS = {"tokens": 123456.0, "flops": 4.2e12, "device_hours": 0.0123, "cost_usd": 0.0246,
                    "tokens_per_s": 3456.0, "mfu": 0.0123, "total_params": 1.0, "active_params": 1.0,
                    "steps": 40.0, "train_seconds": 44.3, "final_loss": 3.1}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from components.data.config import TokenizerConfig
    from components.data.tokenizer import save_tokenizer, train_tokenizer

    texts = [f"What is {a} + {b}? <think>{a} + {b} = {a + b}</think> <answer>{a + b}</answer> The quick brown fox."
             for a in range(40) for b in range(12)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=320))
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tok, out, model_max_length=64)
    return out


def tiny_config(vocab_size: int, *, dense: bool = False, **over) -> ModelConfig:
    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                n_group=2, topk_group=1, first_k_dense_replace=2 if dense else 1, max_position_embeddings=64,
                initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return ModelConfig(**{**base, **over})


@pytest.fixture
def make_model(tokenizer_dir):
    """make_model(seed, dense=False, **overrides) -> a random tiny model with non-zero balancing biases."""
    from tokenizers import Tokenizer

    n_tokens = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()

    def make(seed: int = 0, *, dense: bool = False, **over) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(tiny_config(n_tokens + 8, dense=dense, **over)).eval()
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.gate.e_score_correction_bias.normal_(0, 0.1)
        return model

    return make


@pytest.fixture
def publish_model(tokenizer_dir, tmp_path):
    """publish_model(model) -> URI of the model published as pretraining would (in the configured store):
    `<store>/pretrain/<key>/model` with training.json and a RESULT.json carrying the ledger, and a
    published dataset at `<store>/prep/<key>/dataset` upstream."""
    from components.refs.checkpoint import save_model
    from infra.contract import StageResult
    from infra.settings import get_settings

    def publish(model: Transformer, *, tag: str = "") -> str:
        store = get_settings().store_uri
        k_prep, k_pre = uuid.uuid4().hex, uuid.uuid4().hex
        data_local = tmp_path / f"dataset-{k_prep[:6]}"
        data_local.mkdir()
        (data_local / "meta.json").write_text('{"rows": 3}\n')
        data_uri = storage.join_uri(store, "prep", k_prep[:16], "dataset")
        prep_lineage = {"stage": "prep", "key": k_prep, "inputs": {}, "git_commit": "c0ffee0",
                        "mlflow_run_id": "run-prep-" + k_prep[:6], "prefect_flow_run_id": "flow-" + k_prep[:6]}
        data_manifest = storage.publish_dir(data_local, data_uri, meta={"kind": "dataset", "lineage": prep_lineage})
        storage.write_json(storage.join_uri(store, "prep", k_prep[:16], "RESULT.json"), StageResult(
            stage="prep", outputs={"dataset": data_uri}, metrics={"rows": 3.0}, lineage=prep_lineage,
            mlflow_run_id=prep_lineage["mlflow_run_id"], seconds=2.5).model_dump(mode="json"))

        lineage = {"stage": "pretrain", "key": k_pre, "git_commit": "beefcafe",
                   "inputs": {"dataset": {"uri": data_uri, "hash": "manifest:" + data_manifest.digest()}},
                   "mlflow_run_id": "run-pre-" + k_pre[:6], "prefect_flow_run_id": "flow-" + k_pre[:6],
                   "parent_mlflow_run_id": "parent-" + k_pre[:6], "config": {}}
        ledger = {"tokens": 123456, "flops": 4.2e12, "flops_per_token": 3.4e7, "device": "cpu", "devices": 1,
                  "device_hours": 0.0123, "price_per_device_hour": 2.0, "cost_usd": 0.0246,
                  "device_hours_per_trillion_tokens": 9.96e4, "total_params": 1, "active_params": 1,
                  "mtp_params": 0, "active_fraction": 1.0, "tokens_per_s": 3456.0, "mfu": 0.0123,
                  "peak_flops_per_device": 1e12, "peak_source": "test"}
        local = save_model(model, model.cfg, tmp_path / f"model-{k_pre[:6]}{tag}", tokenizer_dir,
                           extra={"ledger": ledger, "lineage": lineage})
        uri = storage.join_uri(store, "pretrain", k_pre[:16], "model")
        storage.publish_dir(local, uri, meta={"kind": "model", "lineage": lineage})
        storage.write_json(storage.join_uri(store, "pretrain", k_pre[:16], "RESULT.json"), StageResult(
            stage="pretrain", outputs={"checkpoint": uri}, metrics=PRETRAIN_METRICS, lineage=lineage,
            mlflow_run_id=lineage["mlflow_run_id"], seconds=50.0).model_dump(mode="json"))
        return uri

    return publish


@pytest.fixture
def publish_report(tmp_path):
    """publish_report(model_uri, metrics, name) -> URI of a published eval report with one row."""
    from infra.settings import get_settings

    def publish(model_uri: str, metrics: dict, name: str = "m", val_loss: float | None = 2.5) -> str:
        report = {
            "rows": [{"name": name, "uri": model_uri, "ref": model_uri, "metrics": metrics,
                      "by_family": {"arithmetic": {"pass@1": metrics.get("pass@1"), "greedy_accuracy": 0.5}},
                      "val_loss": None if val_loss is None else {"loss": val_loss, "perplexity": 12.18},
                      "efficiency": {}}],
            "settings": {"n_samples": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8, "seed": 5,
                         "k_values": [1, 2]},
            "suite": {"problems": 6, "by_source": {"arithmetic": 6}, "dataset": None},
        }
        local = tmp_path / f"report-{uuid.uuid4().hex[:6]}"
        local.mkdir()
        (local / "report.json").write_text(json.dumps(report))
        uri = storage.join_uri(get_settings().store_uri, "eval", uuid.uuid4().hex[:16], "report")
        storage.publish_dir(local, uri, meta={"kind": "eval-report"})
        return uri

    return publish


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.fixture
def flip_byte():
    """flip_byte(path, offset=None): change one byte of a file in place (the middle one by default)."""
    return _flip_byte



@pytest.fixture(scope="module")
def shared_tracking(tmp_path_factory):
    """One MLflow SQLite database for a whole test module (creating one runs MLflow's migrations, ~10 s);
    tests keep their own MOEFLOW_HOME and store, and use distinct registered model names."""
    from infra.settings import get_settings
    from infra.storage import reset_clients

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEFLOW_TRACKING_URI", f"sqlite:///{db}")
        get_settings.cache_clear()
        reset_clients()
        yield f"sqlite:///{db}"
    get_settings.cache_clear()
    reset_clients()
