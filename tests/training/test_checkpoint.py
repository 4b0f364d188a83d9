"""Checkpoints and the published model: atomic visibility, pruning, pickle-free loading, round trips."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common.config import resolve_model
from components.model.config import ModelConfig
from components.model.model import Transformer
from components.refs import checkpoint as ckpt
from infra import storage

from .conftest import MICRO_MODEL


def micro_model(**over) -> tuple[Transformer, ModelConfig]:
    cfg = ModelConfig.model_validate(resolve_model({**MICRO_MODEL, "vocab_size": 300, **over}))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # a non-zero balancing bias must survive the round trip too
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model, cfg


def fake_checkpoint(out: str, step: int, tmp: Path, publish: bool = True) -> str:
    model, cfg = micro_model()
    local = tmp / f"stage-{step}"
    ckpt.write_checkpoint(local, model_state=model.state_dict(), optimizer_state={"state": {}, "param_groups": []},
                          trainer_state={"step": step}, summary={"step": step}, model_cfg=cfg)
    if publish:
        return ckpt.publish_checkpoint(local, out, step)
    uri = storage.join_uri(ckpt.checkpoints_uri(out), ckpt.step_name(step))
    for p in local.iterdir():  # the files of a save that died before its manifest
        storage.put_file(p, storage.join_uri(uri, p.name))
    return uri


def test_a_checkpoint_without_its_manifest_is_never_the_newest(tmp_path):
    out = str(tmp_path / "out")
    good = fake_checkpoint(out, 10, tmp_path)
    fake_checkpoint(out, 20, tmp_path, publish=False)
    assert ckpt.latest_checkpoint(out) == (10, good)


def test_pruning_keeps_the_newest_k_and_removes_stale_partials(tmp_path):
    out = str(tmp_path / "out")
    for step in (5, 10):
        fake_checkpoint(out, step, tmp_path)
    fake_checkpoint(out, 12, tmp_path, publish=False)  # died mid-save, then the run resumed from 10
    for step in (15, 20):
        fake_checkpoint(out, step, tmp_path)
    deleted = ckpt.prune_checkpoints(out, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [15, 20]
    assert len(deleted) == 3
    left = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert left == ["step_0000015", "step_0000020"]


def test_checkpoint_files_load_without_unpickling_objects(tmp_path):
    out = str(tmp_path / "out")
    uri = fake_checkpoint(out, 3, tmp_path)
    files = ckpt.read_checkpoint(ckpt.fetch_checkpoint(uri))
    assert files["trainer"]["step"] == 3 and "layers.1.mlp.gate.e_score_correction_bias" in files["model"]
    # a tampered optimizer.pt holding an arbitrary object is refused, not executed
    path = Path(uri) / ckpt.OPTIMIZER_FILE
    torch.save({"state": {}, "evil": Path("/")}, path)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_checkpoint(Path(uri))


def test_rng_states_round_trip():
    state = ckpt.rng_state()
    want = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(state)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


@pytest.mark.parametrize("tied", [False, True])
def test_save_model_then_load_model_gives_the_same_logits(tmp_path, micro_dataset, tied):
    model, cfg = micro_model(tie_word_embeddings=tied)
    data_dir = storage.fetch_dir(micro_dataset)
    local = ckpt.save_model(model, cfg, tmp_path / "model", data_dir, extra={"steps": 0})
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "dataset.json",
            "training.json"} <= {p.name for p in local.iterdir()}
    assert json.loads((local / "dataset.json").read_text())["special_tokens"]["eos"] == 1
    uri = str(tmp_path / "published")
    storage.publish_dir(local, uri)
    ids = torch.randint(0, 300, (2, 9))
    want = model.eval()(ids)
    for source in (local, uri):
        loaded, loaded_cfg = ckpt.load_model(source)
        assert loaded_cfg == cfg and not loaded.training
        assert torch.equal(loaded(ids), want)
        bias = loaded.moe_layers()[0].gate.e_score_correction_bias
        assert torch.equal(bias, model.moe_layers()[0].gate.e_score_correction_bias)


def test_load_model_reads_a_training_checkpoint_too(tmp_path):
    out = str(tmp_path / "out")
    uri = fake_checkpoint(out, 7, tmp_path)
    model, cfg = ckpt.load_model(uri)
    ref, _ = micro_model()
    ids = torch.randint(0, 300, (1, 5))
    assert torch.equal(model(ids), ref.eval()(ids))
