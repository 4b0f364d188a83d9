"""Resuming: a job killed with SIGKILL mid-run and started again with the same command ends exactly where
an uninterrupted run ends (CPU, deterministic settings); so does a run that crashed in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from components.refs import checkpoint as ckpt
from components.training.trainer import Trainer
from flows.registry import stage_impl
from infra import entry as infra_job
from infra import storage

from .conftest import REPO, job_command, job_env, micro_config, run_in_process, run_job, write_job


def test_a_crashed_run_resumes_to_the_same_losses_and_weights(micro_dataset, tmp_path, monkeypatch):
    config = micro_config(micro_dataset, steps=12, checkpoint={"every": 4})
    straight = run_in_process(config, str(tmp_path / "a"), tmp_path / "wa")

    original = Trainer.train_step

    def crash_at_step_10(self):
        if self.step == 10:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(config, str(tmp_path / "b"), tmp_path / "wb")
    assert ckpt.latest_checkpoint(str(tmp_path / "b"))[0] == 8
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = run_in_process(config, str(tmp_path / "b"), tmp_path / "wb")

    assert resumed["metrics"]["resumed_from_step"] == 8
    assert resumed["metrics"]["final_loss"] == straight["metrics"]["final_loss"]
    assert resumed["metrics"]["val_loss"] == straight["metrics"]["val_loss"]
    a, _ = ckpt.load_model(straight["outputs"]["checkpoint"])
    b, _ = ckpt.load_model(resumed["outputs"]["checkpoint"])
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    history_a = storage.read_json(storage.join_uri(straight["outputs"]["checkpoint"], "training.json"))
    assert history_a["steps"] == 12


def wait_for(path_uri: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not storage.exists(path_uri):
        assert proc.poll() is None, f"job ended (exit {proc.returncode}) before {path_uri} appeared"
        assert time.monotonic() < deadline, f"{path_uri} did not appear within {timeout}s"
        time.sleep(0.02)


def test_sigkill_mid_run_then_the_same_command_ends_with_the_same_final_loss(micro_dataset, training_home,
                                                                               patch_env, tmp_path):
    config = micro_config(micro_dataset, steps=40, checkpoint={"every": 10, "keep": 2}, eval={"every": 20},
                          metrics={"log_every": 10})
    with patch_env(MOEFLOW_STORE_URI=str(tmp_path / "store-straight")):
        plan_a, _ = write_job(config)  # the uninterrupted run: the job's code in this process (no startup)
        infra_job.run_job("pretrain", stage_impl("pretrain"), storage.read_json(plan_a.job_config_uri))
        result_a = storage.read_json(plan_a.result_uri)

    with patch_env(MOEFLOW_STORE_URI=str(tmp_path / "store-killed")):
        plan_b, _ = write_job(config)
        assert plan_b.key == plan_a.key  # same config and inputs: the same content-addressed stage
        first_ckpt = storage.join_uri(plan_b.output_uri, "checkpoints", "step_0000010", storage.MANIFEST_NAME)
        proc = subprocess.Popen(job_command(plan_b.job_config_uri), cwd=REPO, env=job_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(first_ckpt, proc)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert not storage.exists(plan_b.result_uri)
        killed_at = ckpt.latest_checkpoint(plan_b.output_uri)[0]
        assert 10 <= killed_at < 40

        again = run_job(plan_b.job_config_uri)  # exactly the same command
        assert again.returncode == 0, again.stderr[-3000:]
        result_b = storage.read_json(plan_b.result_uri)

    assert f"resumed from {ckpt.checkpoints_uri(plan_b.output_uri)}" in again.stderr
    assert result_b["metrics"]["resumed_from_step"] == killed_at
    assert "resumed_from_step" not in result_a["metrics"]
    assert result_b["metrics"]["final_loss"] == result_a["metrics"]["final_loss"]
    assert result_b["metrics"]["val_loss"] == result_a["metrics"]["val_loss"]
    weights = lambda r: storage.read_manifest(r["outputs"]["checkpoint"]).files["model.safetensors"].sha256
    assert weights(result_b) == weights(result_a)
    assert [s for s, _ in ckpt.list_checkpoints(plan_b.output_uri)] == [30, 40]  # keep: 2


def test_checkpoints_and_the_model_live_on_s3_and_a_rerun_resumes_from_there(micro_dataset, s3_env, tmp_path):
    config = micro_config(micro_dataset, steps=8, micro_batch_size=8, checkpoint={"every": 4, "keep": 1},
                          eval={"every": 0})
    out = storage.join_uri(s3_env, "pretrain", "run")
    first = run_in_process(config, out, tmp_path / "w1")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [8]  # step 4 pruned (keep 1)
    assert first["outputs"]["checkpoint"].startswith("s3://")
    again = run_in_process(config, out, tmp_path / "w2")  # a retried job: finds step 8, trains nothing
    assert again["metrics"]["resumed_from_step"] == 8
    assert again["metrics"]["final_loss"] == first["metrics"]["final_loss"]
    model, _ = ckpt.load_model(again["outputs"]["checkpoint"])
    assert model.cfg.hidden_size == 32
