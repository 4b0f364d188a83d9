"""Golden curve: the first steps' losses of the tiny preset (configs/tiny.yaml: its prep section's data and
its pretrain section) must stay within RTOL of tests/assets/losses/tiny_pretrain.json.

The curve moves when the data, the model's initialisation or arithmetic, or the training loop changes.
If such a change is intended, regenerate it and commit the new file with the change:
    MOEFLOW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/training/test_golden.py
RTOL covers the last bits that differ between CPUs / BLAS builds (runs on one machine are exact); a
real drift (another init, learning rate, data order or loss) moves the curve by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from components.refs import checkpoint as ckpt
from infra import storage

from .conftest import REPO, run_in_process

GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny_pretrain.json"
STEPS = 6  # inside the preset's warm-up, so the schedule (and the losses) equal a full run's
RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    from components.data.config import PrepConfig
    from components.data.prep import prepare_dataset

    root = tmp_path_factory.mktemp("tiny-dataset")
    prep = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["prep"]
    prepare_dataset(PrepConfig.model_validate(prep), root / "build", progress=False)
    storage.publish_dir(root / "build", str(root / "published"))
    return str(root / "published")


def test_tiny_preset_first_losses_match_the_golden_curve(tiny_dataset, tmp_path):
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["pretrain"]
    assert preset["schedule"]["warmup_steps"] >= STEPS
    config = {**preset, "dataset": tiny_dataset, "steps": STEPS, "eval": {"every": 0, "max_rows": 8}}
    run_in_process(config, str(tmp_path / "out"), tmp_path / "w")
    _, uri = ckpt.latest_checkpoint(str(tmp_path / "out"))
    losses = storage.read_json(storage.join_uri(uri, ckpt.STATE_JSON))["history"]["loss"]
    assert len(losses) == STEPS
    if os.environ.get("MOEFLOW_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({
            "what": "pretrain losses of the tiny preset (configs/tiny.yaml prep + pretrain), steps 1..N",
            "rtol": RTOL, "loss": losses}, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten: {GOLDEN}")
    golden = json.loads(Path(GOLDEN).read_text())["loss"]
    assert losses == pytest.approx(golden, rel=RTOL), list(zip(losses, golden, strict=True))
    assert losses[-1] < losses[0]
