"""ModelConfig: presets load, invalid combinations are rejected with the fix, HF round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.model import ModelConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3"])
def test_presets_load(name):
    cfg = ModelConfig.from_yaml(PRESETS / f"{name}.yaml")
    assert cfg.num_hidden_layers > cfg.first_k_dense_replace


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    data = yaml.safe_load((PRESETS / "tiny.yaml").read_text())
    data["hiden_size"] = 64
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_routed_experts=10, n_group=4), "divisible by n_group"),
        (dict(n_routed_experts=8, n_group=8, topk_group=1), "at least 2 experts"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "raise topk_group or lower num_experts_per_tok"),
        (dict(first_k_dense_replace=5), "first_k_dense_replace"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling type 'linear'"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(eos_token_id=1000), "eos_token_id"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(bias_update_speed=-1.0), "bias_update_speed"),
    ],
)
def test_invalid_combinations_are_rejected_with_the_fix(kit, overrides, message):
    with pytest.raises(ValueError, match=message):
        kit.cfg(**overrides)


def test_to_hf_dict_builds_the_same_transformers_config(kit):
    from transformers import DeepseekV3Config

    cfg = kit.cfg(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                "mscale": 1.0, "mscale_all_dim": 1.0}, mtp_depth=2, fp8=True)
    d = cfg.to_hf_dict()
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert not {"mtp_depth", "mtp_loss_weight", "bias_update_speed", "seq_aux_loss_weight", "fp8"} & set(d)
    hf = DeepseekV3Config(**d)
    for field in ("hidden_size", "q_lora_rank", "kv_lora_rank", "n_group", "topk_group", "routed_scaling_factor",
                  "first_k_dense_replace", "num_experts_per_tok", "v_head_dim", "qk_rope_head_dim"):
        assert getattr(hf, field) == getattr(cfg, field), field
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta


@pytest.mark.parametrize("rope", [None, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_from_hf_dict_reads_what_transformers_writes(kit, rope):
    from transformers import DeepseekV3Config

    cfg = kit.cfg(rope_scaling=rope, rope_theta=5000.0)
    written = DeepseekV3Config(**cfg.to_hf_dict()).to_dict()  # 5.x: rope_parameters, many extra keys
    back = ModelConfig.from_hf_dict(written)
    assert back.model_dump(exclude={"rope_scaling"}) == cfg.model_dump(exclude={"rope_scaling"})
    if rope is None:
        assert back.rope_scaling is None
    else:
        assert back.rope_scaling["type"] == "yarn" and back.rope_scaling["factor"] == 4.0


def test_from_hf_dict_rejects_what_moeflow_cannot_build(kit):
    good = kit.cfg().to_hf_dict()
    with pytest.raises(ValueError, match="quantization_config"):
        ModelConfig.from_hf_dict({**good, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="does not understand"):
        ModelConfig.from_hf_dict({**good, "sliding_window": 128})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({**good, "model_type": "llama"})
    with pytest.raises(ValueError, match="softmax|sigmoid"):
        ModelConfig.from_hf_dict({**good, "scoring_func": "softmax"})


def test_softmax_scale_carries_yarn_mscale_squared(kit):
    plain = kit.cfg()
    assert plain.softmax_scale == pytest.approx(plain.qk_head_dim**-0.5)
    yarn = kit.cfg(rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                                 "mscale_all_dim": 1.0})
    m = 0.1 * 1.0 * __import__("math").log(40.0) + 1.0
    assert yarn.softmax_scale == pytest.approx(plain.qk_head_dim**-0.5 * m * m)
