"""Non-finite losses: skipped up to the configured count, else the run stops with exit code 4, keeps its
last good checkpoint, publishes no model and leaves its MLflow run FAILED."""

from __future__ import annotations

import pytest
import torch

from components.model.model import MoEFlowForCausalLM
from components.refs import checkpoint as ckpt
from flows.registry import stage_impl
from infra import entry as infra_job
from infra import storage
from infra.contract import EXIT_DIVERGED
from infra.tracking import _client

from .conftest import micro_config, run_in_process, write_job


def poison_step(monkeypatch, bad_calls: set[int]) -> None:
    """Make compute_loss return a NaN loss on the given (1-based) training calls."""
    original = MoEFlowForCausalLM.compute_loss
    calls = {"n": 0}

    def compute_loss(self, input_ids, labels):
        out = original(self, input_ids, labels)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(MoEFlowForCausalLM, "compute_loss", compute_loss)


def test_a_nan_loss_stops_the_run_with_exit_code_4_and_a_failed_mlflow_run(micro_dataset, store, monkeypatch):
    config = micro_config(micro_dataset, steps=12, micro_batch_size=8, checkpoint={"every": 4})
    plan, _ = write_job(config)
    poison_step(monkeypatch, {6})  # step 6 (one micro-batch per step)
    payload = storage.read_json(plan.job_config_uri)
    with pytest.raises(Exception) as err:
        infra_job.run_job("pretrain", stage_impl("pretrain"), payload)
    assert infra_job.exit_code_for(err.value) == EXIT_DIVERGED
    message = str(err.value)
    assert "step 6: non-finite loss" in message and "step_0000004" in message
    assert [s for s, _ in ckpt.list_checkpoints(plan.output_uri)] == [4]
    assert not storage.exists(plan.result_uri)
    assert not storage.exists(storage.join_uri(plan.output_uri, "model"))
    runs = _client().search_runs([_client().get_experiment_by_name("moeflow").experiment_id],
                                 filter_string=f"tags.`moeflow.key` = '{plan.key}'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_non_finite_steps_are_skipped_up_to_the_limit(micro_dataset, tmp_path, monkeypatch):
    config = micro_config(micro_dataset, steps=8, micro_batch_size=8, guards={"max_skipped_steps": 2})
    clean = run_in_process(config, str(tmp_path / "clean"), tmp_path / "w0")
    poison_step(monkeypatch, {3, 5})
    result = run_in_process(config, str(tmp_path / "skip"), tmp_path / "w1")
    assert result["metrics"]["skipped_steps"] == 2
    assert result["metrics"]["final_loss"] != clean["metrics"]["final_loss"]  # two updates fewer
    assert storage.is_published(result["outputs"]["checkpoint"])
    poison_step(monkeypatch, {1, 2, 3})  # the counter restarts: three bad steps in the next run
    with pytest.raises(Exception, match="3 non-finite step"):
        run_in_process(config, str(tmp_path / "too-many"), tmp_path / "w2")
