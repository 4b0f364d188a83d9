"""`compile: true`: the trainer runs the model's compiled compute_loss and trains exactly as eager does."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from .conftest import micro_config, run_in_process


def test_compiled_training_steps_give_the_eager_losses(micro_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_COMPILE_BACKEND", "aot_eager")  # the graphs inductor would get, without codegen
    common = {"steps": 3, "checkpoint": {"every": 3}, "eval": {"every": 0}}
    eager = run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "eager"), tmp_path / "we")
    graphs = counters["stats"]["unique_graphs"]
    compiled = run_in_process(micro_config(micro_dataset, compile=True, **common), str(tmp_path / "compiled"),
                              tmp_path / "wc")
    assert counters["stats"]["unique_graphs"] > graphs, "compile: true must run compiled graphs"
    for key in ("final_loss", "val_loss"):
        assert compiled["metrics"][key] == pytest.approx(eager["metrics"][key], rel=1e-5, abs=1e-6), key
