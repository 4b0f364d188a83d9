"""`moeflow prep` end to end, as a user runs it: the CLI, the Prefect flow (ephemeral API), the job
subprocess, the store (local and moto S3 over HTTP) and MLflow (SQLite). Small corpus, real parts."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import storage

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "generators.tasks.n_per_family=150", "--set", "generators.generic_text.n_docs=100",
         "--set", "eval.n_per_family=20", "--set", "tokenizer.vocab_size=400", "--set", "packing.seq_len=64"]


def moeflow(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def published_file_hashes(dataset_uri: str) -> dict[str, str]:
    manifest = storage.read_manifest(dataset_uri)
    assert manifest is not None, f"{dataset_uri} is not published"
    return {path: entry.sha256 for path, entry in manifest.files.items()}


def test_prep_runs_caches_and_matches_on_s3(moeflow_home, s3_env):
    local_store = str(Path(moeflow_home) / "store")
    t0 = time.time()
    first = moeflow("prep", "--config", "configs/tiny.yaml", *SMALL, "--json",
                    env={"MOEFLOW_STORE_URI": local_store})
    first_s = time.time() - t0
    assert first.returncode == 0, first.stderr[-3000:]
    out = last_json(first.stdout)
    assert out["dataset_uri"].startswith(local_store) and out["mlflow_run_id"]
    assert out["stats"]["tokens"]["train"]["tokens"] > 0
    assert "Traceback" not in first.stderr
    _assert_mlflow_conventions(out["mlflow_run_id"], out["dataset_uri"])

    t0 = time.time()
    again = moeflow("prep", "--config", "configs/tiny.yaml", *SMALL, "--json",
                    env={"MOEFLOW_STORE_URI": local_store})
    again_s = time.time() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["dataset_uri"] == out["dataset_uri"]
    assert last_json(again.stdout)["cached"] is True
    assert again_s < first_s / 5, (first_s, again_s)

    on_s3 = moeflow("prep", "--config", "configs/tiny.yaml", *SMALL, "--json",
                    env={"MOEFLOW_STORE_URI": s3_env})
    assert on_s3.returncode == 0, on_s3.stderr[-3000:]
    s3_uri = last_json(on_s3.stdout)["dataset_uri"]
    assert s3_uri.startswith("s3://")
    with_local_settings = published_file_hashes(out["dataset_uri"])
    assert published_file_hashes(s3_uri) == with_local_settings


def _assert_mlflow_conventions(run_id: str, dataset_uri: str) -> None:
    """The job's run as MLflow's own clients expect it: the dataset as a logged dataset (name, digest, source),
    user and source tags, config values as params only (metrics are the statistics)."""
    from mlflow import MlflowClient

    from infra.settings import get_settings

    run = MlflowClient(tracking_uri=get_settings().tracking_uri).get_run(run_id)
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.digest == storage.read_manifest(dataset_uri).digest()[:36]
    assert json.loads(logged.dataset.source)["uri"] == dataset_uri
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "output"}
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.user"] and tags["mlflow.source.name"]
    assert not [k for k in run.data.metrics if k.startswith("config.")], sorted(run.data.metrics)
    assert "tokenizer.vocab_size" in run.data.params


def _assert_nothing_published(store: Path) -> None:
    manifests = list(store.rglob(storage.MANIFEST_NAME)) if store.exists() else []
    results = list(store.rglob("RESULT.json")) if store.exists() else []
    assert manifests == [] and results == [], (manifests, results)


@pytest.mark.parametrize("case", ["broken_lines", "empty_file", "missing_uri", "wrong_type"])
def test_bad_input_fails_clearly_and_publishes_nothing(case, moeflow_home, tmp_path):
    store = Path(moeflow_home) / "store"
    src = tmp_path / "corpus.jsonl.gz"
    extra: list[str] = []
    if case == "broken_lines":
        lines = [json.dumps({"text": f"document number {i} talks about rivers and hills."}) for i in range(40)]
        lines[6] = "{not json"
        lines[17] = json.dumps({"body": "no text field"})
        with gzip.open(src, "wt") as f:
            f.write("\n".join(lines) + "\n")
        expect = [f"{src}:7", f"{src}:18"]
    elif case == "empty_file":
        src = tmp_path / "empty.jsonl"
        src.write_text("")
        expect = [str(src), "empty"]
    elif case == "missing_uri":
        src = tmp_path / "nope.jsonl"
        expect = [str(src), "does not exist"]
    else:
        extra = ["--set", "packing.seq_len=lots"]
        expect = ["prep.packing.seq_len"]
    args = ["prep", "--config", "configs/tiny.yaml", *SMALL, "--set", f"sources=[{{uri: '{src}'}}]", *extra]
    proc = moeflow(*args)
    assert proc.returncode != 0
    for text in expect:
        assert text in proc.stderr, proc.stderr[-3000:]
    _assert_nothing_published(store)
