"""RL from a Qwen2 directory that transformers wrote (random small weights), not published by moeflow:
accepted as a model reference, hashed for lineage, trained for a few GRPO steps, released as a
Qwen2ForCausalLM directory that `release verify` passes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from infra import storage
from infra.contract import ConfigError
from infra.plan import content_hash
from infra.settings import get_settings
from tests.rl.test_stage import config, run_rl


@pytest.fixture
def qwen2_dir(tmp_path, tiny_base):
    """A transformers `save_pretrained` Qwen2 directory with the tiny base's tokenizer beside it."""
    import transformers

    tok = json.loads((tiny_base.dataset_dir / "dataset.json").read_text())
    hf_cfg = transformers.Qwen2Config(
        vocab_size=tok["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg)
    out = tmp_path / "qwen2"
    hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_base.dataset_dir / name).is_file():
            shutil.copy2(tiny_base.dataset_dir / name, out / name)
    return out


def test_plain_transformers_directory_is_a_model_reference(moeflow_home, qwen2_dir, tmp_path):
    from components.model import DenseForCausalLM
    from components.refs.models import load_model_ref

    assert not storage.is_published(str(qwen2_dir))
    loaded = load_model_ref(str(qwen2_dir))
    assert isinstance(loaded.model, DenseForCausalLM) and loaded.kind == "hf"
    assert loaded.cfg.model_type == "qwen2" and loaded.cfg.kv_heads == 2
    assert content_hash(str(qwen2_dir)).startswith("tree:")  # lineage: the files' hashes

    bad = tmp_path / "mistral"
    shutil.copytree(qwen2_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="model_type 'mistral' is not supported"):
        load_model_ref(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_ref(str(empty))


def test_rl_starts_from_a_transformers_qwen2_directory(moeflow_home, tiny_base, qwen2_dir):
    from components.model import DenseForCausalLM
    from components.refs.checkpoint import load_model

    dataset = storage.join_uri(get_settings().store_uri, "fixtures", "dataset")
    storage.publish_dir(tiny_base.dataset_dir, dataset, meta={"kind": "dataset"})
    cfg = config({"model": str(qwen2_dir), "dataset": dataset}, recipe="r1_zero",
                 grpo={"steps": 3, "prompts_per_step": 2, "group_size": 4},
                 eval={"n_problems": 4, "n_samples": 1}, checkpoint={"every": 3, "keep": 1})
    plan, result = run_rl(cfg)
    assert plan.input_hashes["model"].startswith("tree:")
    assert result.metrics["steps"] == 3
    policy, pcfg = load_model(result.outputs["checkpoint"])
    assert isinstance(policy, DenseForCausalLM) and pcfg.model_type == "qwen2"
    start, _ = load_model(str(qwen2_dir))
    moved = any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters(), strict=True))
    assert moved, "GRPO updated the policy"

    from components.release.verify import verify_release
    from flows import registry
    from flows.registry import stage_impl
    from infra.entry import run_job
    from infra.plan import job_payload

    plan = registry.get("release").plan({"model": result.outputs["checkpoint"], "name": "qwen2-rl",
                                         "license": {"holder": "ACME Labs", "year": 2030}})
    released = run_job("release", stage_impl("release"), job_payload(plan, parent_run_id=None, flow_run_id=None))
    uri = released.outputs["release"]
    assert json.loads(storage.read_text(storage.join_uri(uri, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    report = verify_release(uri)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
