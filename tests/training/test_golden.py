"""Golden curve: the first steps' losses of the tiny preset (configs/tiny.yaml: its prep section's data and
its pretrain section) must stay within RTOL of tests/assets/losses/tiny_pretrain.json, on any CPU; and on
one CPU code path two runs give the same bits.

Nothing here samples, and the curve is 6 steps long, so the differences between CPU code paths stay in the
last bits: across the paths of an AMD EPYC (AVX2; default dispatch, ATEN_CPU_CAPABILITY=avx2 and =default,
MKL_ENABLE_INSTRUCTIONS=AVX2, MKL_CBWR=COMPATIBLE), torch 2.13.0, the largest relative difference from
the golden was 1.4e-7 (AVX-512 was not measured). RTOL = 1e-4 leaves a margin of ~700x, while a real
drift (another init, learning rate, data order or loss) moves the curve by 1e-3 or more: a learning rate
10% lower moves it by 3.6e-3. Within one code path the run is exact: `test_tiny_preset_is_bit_reproducible`.

The curve moves when the data, the model's initialisation or arithmetic, or the training loop changes.
If such a change is intended, regenerate it and commit the new file with the change:
    MOEFLOW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/training/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from components.refs import checkpoint as ckpt
from infra import storage
from tests.cpupath import cpu_path

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


def tiny_run(dataset: str, root: Path) -> tuple[list[float], str]:
    """The preset's first STEPS steps -> (losses, final checkpoint's URI)."""
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["pretrain"]
    assert preset["schedule"]["warmup_steps"] >= STEPS
    config = {**preset, "dataset": dataset, "steps": STEPS, "eval": {"every": 0, "max_rows": 8}}
    run_in_process(config, str(root / "out"), root / "w")
    _, uri = ckpt.latest_checkpoint(str(root / "out"))
    losses = storage.read_json(storage.join_uri(uri, ckpt.STATE_JSON))["history"]["loss"]
    assert len(losses) == STEPS
    return losses, uri


@pytest.fixture(scope="module")
def first_run(tiny_dataset, tmp_path_factory) -> tuple[list[float], str]:
    return tiny_run(tiny_dataset, tmp_path_factory.mktemp("tiny-run"))


def test_tiny_preset_first_losses_match_the_golden_curve(first_run):
    losses, _ = first_run
    if os.environ.get("MOEFLOW_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({
            "what": "pretrain losses of the tiny preset (configs/tiny.yaml prep + pretrain), steps 1..N",
            "command": "MOEFLOW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/training/test_golden.py",
            "recorded_on": {"torch": torch.__version__, **cpu_path()},
            "rtol": RTOL, "loss": losses}, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten: {GOLDEN}")
    golden = json.loads(Path(GOLDEN).read_text())["loss"]
    assert losses == pytest.approx(golden, rel=RTOL), list(zip(losses, golden, strict=True))
    assert losses[-1] < losses[0]


def test_tiny_preset_is_bit_reproducible(first_run, tiny_dataset, tmp_path):
    """Same config, same CPU code path -> the same losses and weights, to the bit."""
    losses, uri = first_run
    again, uri_again = tiny_run(tiny_dataset, tmp_path)
    assert again == losses
    a, _ = ckpt.load_model(uri)
    b, _ = ckpt.load_model(uri_again)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
