"""bf16 autocast (what GPUs train with) on the CPU's autocast: the loop must run and stay close to fp32."""

from __future__ import annotations

import pytest

from .conftest import micro_config, run_in_process


def test_bf16_autocast_trains_close_to_fp32(micro_dataset, tmp_path):
    common = {"steps": 4, "micro_batch_size": 8, "checkpoint": {"every": 4}, "eval": {"every": 0}}
    fp32 = run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "fp32"), tmp_path / "w32")
    bf16 = run_in_process(micro_config(micro_dataset, precision="bf16", **common), str(tmp_path / "bf16"),
                          tmp_path / "w16")
    assert bf16["metrics"]["final_loss"] == pytest.approx(fp32["metrics"]["final_loss"], rel=2e-2)
