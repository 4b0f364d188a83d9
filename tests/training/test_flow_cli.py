"""`moeflow pretrain --config FILE --json` end to end: the CLI, the Prefect flow, the job subprocess, MLflow
(metrics, plots, ledger), the published model; the same command again is answered from the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from components.refs import checkpoint as ckpt
from infra.tracking import _client

from .conftest import REPO, job_env, micro_config


def moeflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=300)


def test_cli_pretrains_logs_to_mlflow_publishes_the_model_and_caches(micro_dataset, store, tmp_path):
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(yaml.safe_dump(micro_config(micro_dataset, steps=8, eval={"every": 4})))
    first = moeflow("pretrain", "--config", str(config_file), "--set", "metrics.log_every=2", "--json")
    assert first.returncode == 0, first.stderr[-4000:]
    out = json.loads(first.stdout.strip().splitlines()[-1])
    for key in ("checkpoint_uri", "mlflow_run_id", "final_loss", "tokens_per_s", "mfu"):
        assert out[key] is not None, key
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1 and out["checkpoint_uri"].startswith(store)
    assert "step 4/8 [" in first.stderr and "validation loss" in first.stderr  # progress lines

    model, cfg = ckpt.load_model(out["checkpoint_uri"])
    assert cfg.hidden_size == 32 and cfg.vocab_size == json.loads(
        (ckpt.storage.fetch_dir(micro_dataset) / "dataset.json").read_text())["vocab_size"]

    client = _client()
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["steps"] == "8" and run.data.params["metrics.log_every"] == "2"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history == [1, 2, 4, 6, 8]
    for key in ("val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_mean_load", "load_entropy",
                "expert_load/max_mean/layer1", "expert_load/entropy/mtp1", "expert_bias_norm/layer1",
                "device_hours", "cost_usd", "active_params", "total_params", "flops"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curve.png", "plots/expert_load_heatmap.png", "efficiency_ledger.json",
            "efficiency_ledger.md"} <= artifacts

    again = moeflow("pretrain", "--config", str(config_file), "--set", "metrics.log_every=2", "--json")
    assert again.returncode == 0, again.stderr[-4000:]
    cached = json.loads(again.stdout.strip().splitlines()[-1])
    assert cached["cached"] is True and cached["checkpoint_uri"] == out["checkpoint_uri"]
    assert cached["final_loss"] == out["final_loss"]
