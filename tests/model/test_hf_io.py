"""Export layout, sharding, tokenizer files, atomicity, MTP keys in DeepSeek's layout, trainer state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.model import Transformer, export_hf, load_pretrained, load_state, save_checkpoint_state
from components.model.hf import to_hf_state_dict


def _keys(path):
    keys = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            keys.update({k: sf.get_tensor(k).dtype for k in sf.keys()})
    return keys


def test_export_layout_matches_what_transformers_saves(kit, hf_twin, tmp_path):
    torch.manual_seed(0)
    model = Transformer(kit.cfg())
    hf, path = hf_twin(model)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["rope_interleave"] is True and cfg["num_nextn_predict_layers"] == 0
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == model.cfg.eos_token_id
    ours = _keys(path)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in ours
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in ours
    hf.save_pretrained(tmp_path / "by_transformers")
    assert set(ours) == set(_keys(tmp_path / "by_transformers"))


def test_bf16_export_keeps_router_in_fp32(kit, tmp_path):
    model = Transformer(kit.cfg())
    export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    dtypes = _keys(tmp_path / "bf16")
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["model.layers.1.mlp.experts.0.gate_proj.weight"] == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_export_loads_in_both_directions(kit, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(1)
    model = Transformer(kit.cfg()).eval()
    kit.randomize_biases(model)
    path = export_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(load_pretrained(path)(ids), ref, atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-5, rtol=0)


def test_tokenizer_files_are_copied_and_required(kit, tmp_path):
    model = Transformer(kit.cfg())
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "notes.txt").write_text("not a tokenizer file")
    out = export_hf(model, tmp_path / "with_tok", tokenizer_dir=tok)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert not (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_hf(model, tmp_path / "no_tok", tokenizer_dir=empty)
    assert not (tmp_path / "no_tok").exists() and not (tmp_path / "no_tok.partial").exists()


def test_export_never_overwrites_a_non_empty_directory(kit, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "README.md").write_text("someone else's")
    with pytest.raises(FileExistsError):
        export_hf(Transformer(kit.cfg()), out)
    assert [p.name for p in out.iterdir()] == ["README.md"]


def test_pickle_checkpoints_are_never_loaded(kit, tmp_path):
    path = export_hf(Transformer(kit.cfg()), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_pretrained(path)


def test_deepseek_layout_mtp_weights_load_into_mtp_modules(kit, tmp_path):
    """DeepSeek's checkpoints keep MTP module k at model.layers.{L + k}, with copies of embedding and head."""
    torch.manual_seed(2)
    model = Transformer(kit.cfg(mtp_depth=1))
    L = model.cfg.num_hidden_layers
    tensors = to_hf_state_dict(model)
    for name, t in model.mtp[0].state_dict().items():
        if name.startswith("mlp.experts.w_"):
            which = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[name.split(".")[-1]]
            for e in range(t.shape[0]):
                tensors[f"model.layers.{L}.mlp.experts.{e}.{which}.weight"] = t[e].clone()
        else:
            tensors[f"model.layers.{L}.{name}"] = t.clone()
    tensors[f"model.layers.{L}.embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
    tensors[f"model.layers.{L}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    path = tmp_path / "ds"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    hf_cfg = {**model.cfg.to_hf_dict(), "num_nextn_predict_layers": 1}
    (path / "config.json").write_text(json.dumps(hf_cfg))

    loaded = load_pretrained(path, mtp_depth=1)
    for (name, a), b in zip(model.mtp.state_dict().items(), loaded.mtp.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    labels = torch.randint(0, model.cfg.vocab_size, (2, 9))
    model.eval()
    torch.testing.assert_close(loaded.compute_loss(ids, labels).mtp_loss, model.compute_loss(ids, labels).mtp_loss)
    # without asking for MTP the modules are skipped; asking for more than the files hold initialises them
    assert len(load_pretrained(path).mtp) == 0
    fresh = load_pretrained(path, mtp_depth=2)
    assert torch.isfinite(fresh.compute_loss(ids, labels).mtp_loss)
    assert torch.equal(fresh.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


def test_checkpoint_state_round_trips_through_safetensors_with_tied_embeddings(kit, tmp_path):
    torch.manual_seed(3)
    model = Transformer(kit.cfg(tie_word_embeddings=True, mtp_depth=1)).eval()
    kit.randomize_biases(model)
    assert model.lm_head is None and model.output_weight() is model.embed_tokens.weight
    state = save_checkpoint_state(model)
    assert not any("lm_head" in k for k in state)
    save_file(state, str(tmp_path / "ckpt.safetensors"))  # fails on shared storages
    from safetensors.torch import load_file

    other = Transformer(kit.cfg(tie_word_embeddings=True, mtp_depth=1)).eval()
    load_state(other, load_file(str(tmp_path / "ckpt.safetensors")))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), model(ids), atol=0, rtol=0)
    for a, b in zip(model.moe_layers(), other.moe_layers(), strict=True):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)


def test_export_from_trainer_state_file(kit, tmp_path):
    """``moeflow model export``: a YAML config + a safetensors state dict -> an HF directory."""
    import yaml

    from components.model import export_from_state, model_info_from_file

    torch.manual_seed(4)
    cfg = kit.cfg(mtp_depth=1)
    model = Transformer(cfg).eval()
    kit.randomize_biases(model)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    save_file(save_checkpoint_state(model), str(tmp_path / "state.safetensors"))
    out = export_from_state(tmp_path / "model.yaml", tmp_path / "state.safetensors", tmp_path / "release",
                            dtype="bfloat16")
    assert _keys(out)["model.embed_tokens.weight"] == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(ids), model(ids), atol=0.1, rtol=0.05)
    assert model_info_from_file(tmp_path / "model.yaml")["total_params"] == model.param_counts()["total"]
    other = Transformer(kit.cfg(num_hidden_layers=2))
    save_file(save_checkpoint_state(other), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not match the config"):
        export_from_state(tmp_path / "model.yaml", tmp_path / "other.safetensors", tmp_path / "bad")
