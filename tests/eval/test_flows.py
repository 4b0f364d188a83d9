"""The eval flows as users run them: `moeflow eval --config ... --json` (CLI -> Prefect flow -> job
subprocess -> store + MLflow) and the recurring `eval-champion` flow appending to its history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from infra import storage

REPO = Path(__file__).resolve().parents[2]
SAMPLING = {"n_samples": 2, "k_values": [1, 2], "max_new_tokens": 8, "batch_size": 8}


def python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_cli_eval_and_champion_history(module_home, make_model, publish_model, task_file, tmp_path):
    from infra.tracking import _client

    env = {"MOEFLOW_HOME": module_home, "PREFECT_HOME": str(Path(module_home) / "prefect"), "OMP_NUM_THREADS": "1"}
    uri = publish_model(make_model(), "champ")
    client = _client()
    client.create_registered_model("flowtest")
    mv = client.create_model_version("flowtest", source=uri, tags={"moeflow.model_uri": uri})
    client.set_registered_model_alias("flowtest", "champion", mv.version)

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"eval": {
        "models": [{"uri": "models:/flowtest@champion"}, {"uri": uri, "name": "by-uri"}],
        "suite": {"task_files": [str(task_file)]}, "sampling": SAMPLING, "threads": 1}}))
    # one process (one Prefect start-up): the CLI, then the champion flow twice (the second run's stage is
    # cached: the same model version on the same problems; the history still gets its row)
    champion = ("eval_champion_flow(model_name='flowtest', task_files=[" + repr(str(task_file)) + "], "
                "sampling={'n_samples': 2, 'k_values': [1, 2], 'max_new_tokens': 8, 'batch_size': 8})")
    code = ("import json, sys\nfrom flows.cli import main\n"
            f"assert main(['eval', '--config', {str(cfg)!r}, '--json']) == 0\n"
            "from flows.eval import eval_champion_flow\n"
            f"{champion}\nprint(json.dumps({champion}))")
    proc = python(code, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-2])
    assert [m["name"] for m in out["models"]] == ["flowtest@champion", "by-uri"]
    assert out["models"][0]["metrics"] == out["models"][1]["metrics"]  # the same model, the same seeds
    assert out["models"][0]["uri"] == uri and out["mlflow_run_id"] and out["parent_run_id"]
    assert "| flowtest@champion |" in proc.stderr  # the table is printed
    parent_files = [a.path for a in client.list_artifacts(out["parent_run_id"])]
    assert "report.md" in parent_files

    summary = json.loads(lines[-1])
    history = storage.read_json(summary["history_uri"])
    assert [row["version"] for row in history] == [str(mv.version)] * 2
    assert history[0]["metrics"] == history[1]["metrics"] == out["models"][0]["metrics"]
    run = client.get_run(summary["parent_run_id"])
    assert run.data.tags["moeflow.model_ref"] == "models:/flowtest@champion"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pass_at_1")] == [1]
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/history.png"]
