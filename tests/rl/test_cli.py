"""`moeflow rl --config ... --json` as users run it: the CLI, the Prefect flow (ephemeral API), the job
subprocess, the store and MLflow; the flow publishes the sample completions as a Prefect table artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from infra import storage
from infra.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
LAST_KEYS = ["checkpoint_uri", "mlflow_run_id", "reward_start", "reward_end", "accuracy_start", "accuracy_end"]


def test_cli_runs_the_flow_and_ends_with_the_headline_json(moeflow_home, tiny_base, tmp_path):
    store = get_settings().store_uri
    model, dataset = storage.join_uri(store, "fx", "model"), storage.join_uri(store, "fx", "dataset")
    storage.publish_dir(tiny_base.model_dir, model)
    storage.publish_dir(tiny_base.dataset_dir, dataset)
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(yaml.safe_dump({"rl": {
        "model": model, "threads": 1,
        "tasks": {"n_prompts": 40, "knobs": {"arithmetic": {"min_operands": 2, "max_operands": 2, "max_value": 6}}},
        "rewards": {"max_completion_len": 24, "overlong_cache_len": 4},
        "grpo": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "schedule": {"warmup_steps": 0}},
        "eval": {"n_problems": 8, "n_samples": 2, "max_new_tokens": 24},
        "samples": {"every": 1, "n": 2}}}))
    # the dataset comes from the model's lineage unless given: this base has none, so it is set here
    code = ("import json\nfrom flows.cli import main\n"
            f"assert main(['rl', '--config', {str(cfg)!r}, '--set', 'dataset={dataset}', '--json']) == 0\n"
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as client:\n"
            "    arts = client.read_artifacts()\n"
            "print(json.dumps({a.key: a.data for a in arts if a.key}))\n")
    env = {**os.environ, "PREFECT_HOME": str(Path(moeflow_home) / "prefect"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-2])
    keys = list(out)
    assert keys[keys.index("checkpoint_uri"):][: len(LAST_KEYS)] == LAST_KEYS
    assert keys[-1] == "seconds"  # the CLI adds the elapsed time last
    assert storage.is_published(out["checkpoint_uri"]) and out["mlflow_run_id"]
    assert 0 <= out["accuracy_start"] <= 1 and 0 <= out["accuracy_end"] <= 1
    assert "held-out arithmetic pass@1" in proc.stderr  # the human summary

    artifacts = json.loads(lines[-1])
    table = artifacts["rl-samples"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["step"] for r in rows} == {1, 2} and all("completion" in r for r in rows)
    assert "rl-summary" in artifacts and "mlflow-run" in artifacts
