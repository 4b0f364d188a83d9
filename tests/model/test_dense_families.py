"""The dense families (Llama, Qwen2) against the installed transformers: same weights, same numbers.

fp32 throughout; logits within 1e-5 absolute, every gradient within 1e-5 relative to its largest entry.
Both directions: a directory transformers saved (single file or sharded, tied or untied) loaded by
``load_pretrained``, and ``export_hf`` loaded by ``AutoModelForCausalLM``. transformers runs eager attention.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from components.model import (
    DenseForCausalLM,
    LlamaConfig,
    Qwen2Config,
    build_model,
    config_from_dict,
    config_from_hf_dict,
    export_hf,
    generate,
    load_pretrained,
    model_info,
)
from components.model.hf import dense_to_hf_state_dict

ATOL = 1e-5
SMALL = dict(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=1)
LLAMA3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)

# family, overrides: head ratios MHA / GQA / MQA, rope scaling on/off, biases on/off, tied/untied.
CASES = {
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-llama3-bias-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, rope_scaling=LLAMA3,
                                                 attention_bias=True, tie_word_embeddings=True)),
    "llama-mqa-llama3-headdim": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                                               rope_scaling=LLAMA3, rope_theta=500000.0)),
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=36,
                                     tie_word_embeddings=True)),
    "qwen2-mha-yarn": ("qwen2", dict(num_attention_heads=2, num_key_value_heads=2, rope_scaling=YARN)),
    "qwen2-mqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=1000000.0)),
}


def _hf_model(name: str, seed: int = 0):
    """A transformers model of the case with random weights (biases too), eager attention, fp32."""
    import transformers

    family, overrides = copy.deepcopy(CASES[name])  # transformers writes into the rope dict it is given
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):  # transformers initialises biases to zero: make them matter
                p.normal_(0.0, 0.2)
    return hf.eval()


def _ids(vocab: int, shape=(2, 23), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_directory_loads_with_equal_logits_and_gradients(name, tmp_path, kit):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert isinstance(model, DenseForCausalLM) and model.cfg.model_type == CASES[name][0]
    assert (model.lm_head is None) == model.cfg.tie_word_embeddings
    V = model.cfg.vocab_size
    ids = _ids(V)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)

    model.train()
    hf.train()
    out, hf_loss = kit.train_both(model, hf, ids, n_ignored=4)
    torch.testing.assert_close(out.loss, hf_loss, atol=ATOL, rtol=0)
    assert out.mtp_loss is None and out.aux_loss is None

    # our gradients in transformers' layout (q/k rows back in rotate-half order), by the export mapping
    grads = {n: p.grad for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(grads[n])
    ours = dense_to_hf_state_dict(model)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert set(ours) == set(hf_grads)  # every transformers parameter is compared
    for n, ref in hf_grads.items():
        scale = ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(ours[n] / scale, ref / scale, atol=ATOL, rtol=0, msg=n)


@pytest.mark.parametrize("name", ["llama-mha-llama3-bias-tied", "llama-mqa-llama3-headdim", "qwen2-gqa-tied"])
def test_export_loads_in_transformers_as_its_family(name, tmp_path):
    import transformers

    family, overrides = CASES[name]
    cfg = config_from_dict({"model_type": family, **SMALL, **overrides})
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.2)
    path = export_hf(model, tmp_path / "export", max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    written = json.loads((path / "config.json").read_text())
    assert written["architectures"] == [cfg.architecture] and written["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == cfg.architecture
    assert hf.config.num_key_value_heads == cfg.kv_heads
    ids = _ids(cfg.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(ids).logits, atol=ATOL, rtol=0)
    # and back: our export reads back to the same model
    again = load_pretrained(path)
    assert again.cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)


def test_sharded_transformers_save_with_tied_copy_written_loads(tmp_path):
    hf = _hf_model("qwen2-mqa", seed=5)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path / "sharded")
    ids = _ids(model.cfg.vocab_size, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_kv_cache_generation_matches_full_forward_on_ragged_prompts():
    cfg = LlamaConfig(**{**SMALL, **CASES["llama-mqa-llama3-headdim"][1]})
    torch.manual_seed(7)
    model = DenseForCausalLM(cfg).eval()
    prompts = [[5, 9, 11, 3, 2, 8, 30], [4, 6], [12, 13, 14, 15]]
    results = generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_token_id=())
    for p, r in zip(prompts, results, strict=True):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert r.tokens == seq[len(p):]
    # sampling with several samples per prompt runs through cache.select
    sampled = generate(model, prompts, max_new_tokens=5, temperature=1.0, seed=0, num_samples=2)
    assert len(sampled) == 6 and all(1 <= len(r.tokens) <= 5 for r in sampled)
    cache = model.allocate_cache(2, 10, dtype=torch.float32, device="cpu")
    assert cache.nbytes_per_token() == model_info(cfg, dtype_bytes=4)["kv_cache_bytes_per_token"]


@pytest.mark.parametrize("name", list(CASES))
def test_param_counts_match_the_built_model(name):
    family, overrides = CASES[name]
    model = build_model(config_from_dict({"model_type": family, **SMALL, **overrides}))
    counts = model.param_counts()
    assert counts["total"] == counts["active"] == sum(p.numel() for p in model.parameters())
    assert model.expert_counts().numel() == 0 and model.moe_layers() == []


def test_config_round_trips_through_transformers_config_classes():
    import transformers

    for family, hf_cls in (("llama", transformers.LlamaConfig), ("qwen2", transformers.Qwen2Config)):
        for _name, (fam, overrides) in CASES.items():
            if fam != family:
                continue
            cfg = config_from_dict({"model_type": family, **SMALL, **overrides})
            hf_cfg = hf_cls(**copy.deepcopy(cfg.to_hf_dict()))
            assert config_from_hf_dict(hf_cfg.to_dict()) == cfg
            assert config_from_dict(cfg.model_dump()) == cfg  # moeflow's own config.json form


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: LlamaConfig.from_dict({**SMALL, "num_attention_heads": 4, "num_key_value_heads": 3}),
         r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        (lambda: LlamaConfig.from_dict({**SMALL, "sliding_window": 8}),
         r"unknown model config key\(s\) \['sliding_window'\]"),
        (lambda: Qwen2Config.from_dict({**SMALL, "model_type": "llama"}), "a Qwen2Config needs model_type: qwen2"),
        (lambda: LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
        (lambda: LlamaConfig(**SMALL, rope_scaling={"rope_type": "llama3", "factor": 2.0}), "low_freq_factor"),
        (lambda: LlamaConfig(**SMALL, head_dim=7), r"head_dim \(7\) must be even"),
        (lambda: LlamaConfig(**SMALL, attention_dropout=0.1), "attention_dropout"),
        (lambda: LlamaConfig(**SMALL, rope_theta=1e4, rope_scaling={**LLAMA3, "rope_theta": 5e5}), "contradicts"),
        (lambda: config_from_hf_dict({"model_type": "qwen2", **SMALL, "use_sliding_window": True}),
         "use_sliding_window"),
        (lambda: config_from_hf_dict({"model_type": "llama", **SMALL, "mlp_bias": True}), "mlp_bias"),
        (lambda: config_from_hf_dict({"model_type": "llama", **SMALL, "hidden_act": "gelu"}), "hidden_act 'gelu'"),
        (lambda: config_from_hf_dict({"model_type": "llama", **SMALL, "mystery": 1}), r"understand: \['mystery'\]"),
        (lambda: config_from_hf_dict({"model_type": "mistral", **SMALL}), "model_type 'mistral' is not supported"),
    ],
)
def test_bad_configs_are_errors_naming_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mis_shaped_checkpoint_is_an_error_naming_the_tensor(tmp_path):
    hf = _hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 32\), the config implies \(32, 32\)"):
        load_pretrained(tmp_path / "hf")
