"""Release directories: layout, LICENSE, SHA256SUMS and model card (build_release + publish_release), and
`verify_release` / `moeflow release verify` -- passing on intact MoE and dense releases, failing on one
changed byte, an unlisted pickle or a missing manifest. Logits: fp32, atol 1e-4 (transformers vs moeflow)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from components.model import model_info
from components.refs.lineage import lineage_chain
from components.release.build import build_release, publish_release
from components.release.card import ReleaseCard, license_text, portable
from components.release.evidence import efficiency_ledger, load_evaluation
from components.release.verify import SUMS_NAME, verify_release
from infra import storage

LAYOUT = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "README.md", "LICENSE", SUMS_NAME}
MIT_LINES = ["MIT License", "", "Copyright (c) 2031 Jane Doe", "",
             "Permission is hereby granted, free of charge, to any person obtaining a copy"]


def make_release(model, tokenizer_dir: Path, out: Path, uri: str | None = None, **kw) -> tuple[dict, str | None]:
    card = ReleaseCard(name="tiny", model_cfg=model.cfg, license_holder=kw.pop("holder", "Jane Doe"),
                       license_year=kw.pop("year", 2031), intended_use="tests", limitations=["tiny"],
                       **{k: kw.pop(k) for k in list(kw) if k in ("evaluation", "ledger", "chain", "gate")})
    built = build_release(model, out, tokenizer_dir=tokenizer_dir, card=card, **kw)
    if uri is not None:
        publish_release(built["dir"], uri)
    return built, uri


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_release_has_the_layout_the_mit_license_and_correct_sha256sums(kind, make_model, tokenizer_dir, tmp_path):
    model = make_model(dense=kind == "dense", mtp_depth=1)  # MTP modules never reach a release
    built, _ = make_release(model, tokenizer_dir, tmp_path / "rel")
    out = built["dir"]
    assert {p.name for p in out.iterdir()} == LAYOUT
    assert (out / "LICENSE").read_text() == license_text("Jane Doe", 2031)
    assert (out / "LICENSE").read_text().splitlines()[:5] == MIT_LINES
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    assert layers == set(range(model.cfg.num_hidden_layers))  # no MTP layer index
    lines = (out / SUMS_NAME).read_text().splitlines()
    listed = {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in lines}
    assert set(listed) == LAYOUT - {SUMS_NAME}
    for name, digest in listed.items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", SUMS_NAME], cwd=out, check=True)
    assert built["export_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_verify_passes_on_an_intact_release(kind, make_model, tokenizer_dir, tmp_path, moeflow_home):
    uri = str(tmp_path / "store" / "release")
    make_release(make_model(seed=3, dense=kind == "dense"), tokenizer_dir, tmp_path / "rel", uri)
    report = verify_release(uri)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    names = {c["name"] for c in report["checks"]}
    assert {"manifest", "layout", "license", "config", "tokenizer", "transformers load", "moeflow load",
            "logits"} <= names
    assert {f"sha256 {f}" for f in LAYOUT} <= names
    assert 0 <= report["max_abs_diff"] <= 1e-4
    assert report["warnings"] == [] and report["failed_files"] == []


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_and_qwen2_releases_verify_against_their_transformers_class(family, tokenizer_dir, tmp_path,
                                                                          moeflow_home):
    from tokenizers import Tokenizer

    from components.model import build_model, config_from_dict

    n_tokens = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    cfg = config_from_dict(dict(model_type=family, vocab_size=n_tokens + 8, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2, tie_word_embeddings=family == "qwen2"))
    torch.manual_seed(4)
    model = build_model(cfg).eval()
    uri = str(tmp_path / "store" / "release")
    built, _ = make_release(model, tokenizer_dir, tmp_path / "rel", uri)
    written = json.loads((built["dir"] / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [cfg.architecture]
    card = (built["dir"] / "README.md").read_text()
    assert f"`{cfg.architecture}`" in card and "grouped-query attention" in card and f"- {family}" in card
    report = verify_release(uri)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["transformers load"]["detail"].startswith(cfg.architecture)
    assert 0 <= report["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json"])
def test_one_changed_byte_fails_verification_naming_the_file(victim, make_model, tokenizer_dir, tmp_path,
                                                             moeflow_home, flip_byte):
    uri = str(tmp_path / "store" / "release")
    make_release(make_model(seed=4), tokenizer_dir, tmp_path / "rel", uri)
    flip_byte(Path(uri) / victim)
    report = verify_release(uri)
    assert not report["ok"]
    assert report["failed_files"][0] == victim
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed[0]["name"] == f"sha256 {victim}"
    assert "MANIFEST.json" in failed[0]["detail"] and SUMS_NAME in failed[0]["detail"]


def test_unlisted_pickle_and_missing_manifest_fail(make_model, tokenizer_dir, tmp_path, moeflow_home):
    uri = str(tmp_path / "store" / "release")
    make_release(make_model(seed=5), tokenizer_dir, tmp_path / "rel", uri)
    torch.save({"x": torch.ones(1)}, Path(uri) / "pytorch_model.bin")
    report = verify_release(uri)
    bad = {c["name"] for c in report["checks"] if not c["ok"]}
    assert not report["ok"] and {"sha256 pytorch_model.bin", "layout"} <= bad
    (Path(uri) / "pytorch_model.bin").unlink()
    (Path(uri) / storage.MANIFEST_NAME).unlink()
    report = verify_release(uri)
    assert not report["ok"] and [c["name"] for c in report["checks"] if not c["ok"]] == ["manifest"]
    assert not verify_release(str(tmp_path / "nothing-here"))["ok"]


def test_bfloat16_sharded_release_verifies(make_model, tokenizer_dir, tmp_path, moeflow_home, flip_byte):
    uri = str(tmp_path / "store" / "release")
    built, _ = make_release(make_model(seed=6), tokenizer_dir, tmp_path / "rel", uri, dtype="bfloat16",
                            max_shard_bytes=20_000)
    shards = sorted(f for f in built["files"] if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in built["files"]
    with safe_open(str(Path(uri) / shards[0]), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "BF16" in dtypes.values()
    assert all(v == "F32" for k, v in dtypes.items() if k.endswith(("mlp.gate.weight", "e_score_correction_bias")))
    report = verify_release(uri)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    flip_byte(Path(uri) / shards[-1])
    assert verify_release(uri)["failed_files"] == [shards[-1]]


def test_verify_downloads_from_s3_and_catches_a_changed_object(make_model, tokenizer_dir, tmp_path, s3_env):
    uri = f"{s3_env}/release"
    make_release(make_model(seed=7, dense=True), tokenizer_dir, tmp_path / "rel", uri)
    report = verify_release(uri)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    obj = storage.join_uri(uri, "model.safetensors")
    data = bytearray(storage.read_bytes(obj))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(obj, bytes(data))
    report = verify_release(uri)
    assert not report["ok"] and report["failed_files"] == ["model.safetensors"]


def test_cli_verify_exit_code_json_and_quiet_output(make_model, tokenizer_dir, tmp_path, moeflow_home, capfd,
                                                    flip_byte):
    from flows.cli import main

    uri = str(tmp_path / "store" / "release")
    make_release(make_model(seed=8), tokenizer_dir, tmp_path / "rel", uri)
    assert main(["release", "verify", uri, "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True
    assert "release verified" in err
    noise = [ln for ln in err.splitlines() if not ln.startswith("  [ok]") and "release verified" not in ln]
    assert noise == []  # no warnings, no progress bars
    flip_byte(Path(uri) / "model.safetensors")
    assert main(["release", "verify", uri]) == 1
    assert "[FAIL] sha256 model.safetensors" in capfd.readouterr().err


def test_model_card_shows_architecture_evaluation_ledger_and_lineage(make_model, publish_model, publish_report,
                                                                    tokenizer_dir, tmp_path, moeflow_home):
    model = make_model(seed=9)
    model_uri = publish_model(model)
    report_uri = publish_report(model_uri, {"pass@1": 0.4375, "pass@1_stderr": 0.05, "format_rate": 0.9})
    evaluation = load_evaluation(report_uri, model_uris=[model_uri], explicit={"custom_score": 7.0})
    chain = lineage_chain(model_uri)
    ledger = efficiency_ledger(chain)
    built, _ = make_release(model, tokenizer_dir, tmp_path / "rel", evaluation=evaluation, chain=chain, ledger=ledger)
    card = (built["dir"] / "README.md").read_text()
    info = model_info(model.cfg)
    assert card.startswith("---\n") and "\nlicense: mit\n" in card.split("\n---\n")[0]  # huggingface_hub order
    assert f"({info['total_params']:,})" in card and f"({info['active_params']:,}," in card
    assert "| pass@1 | 0.4375 ± 0.05 | report |" in card
    assert "| val_loss | 2.5 | report |" in card
    assert "| custom_score | 7 | given in the release config |" in card
    assert "| training tokens | 123K (123,456) |" in card and "| device-hours | 0.0123 |" in card
    assert "$0.0246 at $2/device-hour" in card and "| MFU | 1.23% of 1 TFLOP/s (test) |" in card
    assert [e["stage"] for e in chain] == ["pretrain", "prep"]
    for e in chain:  # every link: URI, hash, git commit, MLflow run, Prefect flow run
        for value in (portable(e["uri"]), e["hash"], e["git_commit"], e["mlflow_run_id"], e["prefect_flow_run_id"]):
            assert f"`{value}`" in card, value
        assert e["hash"].startswith("manifest:")
    assert chain[0]["hash"] == "manifest:" + storage.read_manifest(model_uri).digest()
    assert chain[1]["hash_matches_lineage"] is True
    assert ledger["device_hours"] == pytest.approx(0.0123) and ledger["complete"] is False  # prep reported none
    assert "## Intended use" in card and "## Limitations" in card and "- tiny" in card
