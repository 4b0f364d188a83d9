"""prep -> a 4-step pretrain -> eval -> release through the cluster's own topology on loopback
(`moeflow up --cluster-like`: PostgreSQL, Prefect server + a process worker, MLflow server with
S3-proxied artifacts, moto's S3): the flows deployed with `prefect deploy` from the repository's
prefect.yaml (pool renamed to the stack's process pool), each run through the worker with
`run_deployment`. Checks: every output on S3 and nothing in a local store, MLflow's runs, metrics,
artifacts and registered versions in PostgreSQL / S3 and loaded through the server, the Prefect flow and
task runs Completed, and a second prep run finds its stage cached on S3.

Skipped without Debian's PostgreSQL (`make browser` installs it).
Takes 2m50s to 4m50s on 2 shared cores (measured; starting the stack and `prefect deploy` are ~1.5 min).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra import stack as stack_mod

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
                                reason="PostgreSQL (Debian package) is not installed: `make browser` as root")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, free_port) -> Iterator[stack_mod.ClusterStack]:
    from infra.settings import Settings

    home = tmp_path_factory.mktemp("stack-home")
    s = stack_mod.ClusterStack(Settings(home=home), prefect_port=free_port(), mlflow_port=free_port(),
                               s3_port=free_port(), pg_port=free_port())
    import mlflow

    from infra.settings import get_settings

    s.start()
    get_settings.cache_clear()  # this process is now a flow-run client of the stack (s3 store, MLflow server)
    mlflow.set_tracking_uri(s.mlflow_url)
    try:
        s.deploy()
        yield s
    finally:
        procs = [p.pid for p in s.procs]
        s.stop()
        get_settings.cache_clear()
        for pid in procs:  # clean shutdown: nothing it started is left
            assert subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode == 1, pid
        assert not (s.postgres.data_dir / "postmaster.pid").exists()


def _run(name: str, params: dict[str, Any], cached: bool = False) -> tuple[Any, Any]:
    """Run deployment `name` with the form's parameters (the tiny preset, fields, `key=value` overrides), as
    the Prefect UI would, through the worker; the flow run and its stage's StageResult (RESULT.json on
    S3, found through the stage's MLflow run tagged with the flow run's id). A cached stage starts no job
    and logs no stage run: then the flow's own MLflow run is returned instead."""
    import mlflow
    from prefect.deployments import run_deployment

    from infra import storage
    from infra.contract import StageResult

    fr = run_deployment(f"{name}/{name}", parameters={"preset": "tiny", **params}, timeout=600)
    assert fr.state.is_completed(), (name, fr.state)
    runs = mlflow.MlflowClient().search_runs(
        experiment_ids=[e.experiment_id for e in mlflow.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{fr.id}'")
    stage_runs = [r for r in runs if r.data.tags.get("moeflow.stage") == name]
    if cached:
        assert not stage_runs and len(runs) == 1, (name, runs)
        return fr, runs[0]
    assert len(stage_runs) == 1, (name, runs)
    runs = stage_runs
    key = runs[0].data.tags["moeflow.key"]
    uri = f"{os.environ['MOEFLOW_STORE_URI']}/{name}/{key[:16]}/RESULT.json"
    return fr, StageResult.model_validate_json(storage.read_text(uri))


@pytest.fixture(scope="module")
def pipeline(stack) -> dict[str, Any]:
    t0 = time.time()
    prep = {"overrides": ["generators.tasks.n_per_family=300", "generators.generic_text.n_docs=50",
                          "eval.n_per_family=8", "tokenizer.vocab_size=512"]}
    out: dict[str, Any] = {"prep": _run("prep", prep)}
    dataset = out["prep"][1].outputs["dataset"]
    out["pretrain"] = _run("pretrain", {"dataset": dataset, "steps": 4, "overrides": [
        "eval.every=4", "eval.max_rows=4", "checkpoint.every=4", "checkpoint.keep=1", "schedule.warmup_steps=1"]})
    ckpt = out["pretrain"][1].outputs["checkpoint"]
    out["eval"] = _run("eval", {"dataset": dataset, "overrides": [
        f"models=[{{uri: '{ckpt}', name: base}}]", "suite.max_per_family=4", "sampling.n_samples=1",
        "sampling.max_new_tokens=8", "sampling.k_values=[1]"]})
    out["release"] = _run("release", {"model": ckpt, "eval_report": out["eval"][1].outputs["report"],
                                      "name": "stack-tiny", "overrides": ["eval_model=base"]})
    out["prep-again"] = _run("prep", prep, cached=True)
    out["seconds"] = time.time() - t0
    return out


def test_every_output_lives_on_s3_and_nothing_in_a_local_store(stack, pipeline):
    from infra import storage

    for name in ("prep", "pretrain", "eval", "release"):
        for uri in pipeline[name][1].outputs.values():
            assert uri.startswith(f"s3://{stack_mod.BUCKET}/{stack_mod.STORE_PREFIX}/"), (name, uri)
            assert storage.exists(uri) or storage.list_uris(uri), (name, uri)
    homes = [stack.settings.home, stack.stack_home / "flow-runs"]
    assert not any((h / "store").exists() for h in homes)
    assert not (stack.settings.home / "mlflow.db").exists() and not (stack.settings.home / "mlartifacts").exists()


def test_mlflow_runs_metrics_artifacts_and_versions_are_in_postgres_and_s3(stack, pipeline):
    import boto3
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(pipeline["pretrain"][1].mlflow_run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    assert client.get_metric_history(run.info.run_id, next(iter(run.data.metrics)))
    version = pipeline["release"][1].extra["version"]
    mv = client.get_model_version("stack-tiny", str(version))
    assert mv.status == "READY"
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, region_name=stack_mod.REGION)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack_mod.BUCKET, Prefix="mlflow-artifacts/") for o in page.get("Contents", [])]
    assert any(run.info.run_id in k for k in keys), keys[:20]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=""))
    assert any(local.iterdir())  # loads back through the MLflow server
    import psycopg2

    pg = stack.postgres
    with psycopg2.connect(host=pg.host, port=pg.port, user=stack_mod.PG_USER, password=pg.password,
                          dbname=stack_mod.PG_DATABASES["mlflow"]) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from runs where run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == 1
        cur.execute("select count(*) from model_versions where name = 'stack-tiny'")
        assert cur.fetchone()[0] >= 1


def _api_post(stack, path: str, body: dict[str, Any]) -> Any:
    import base64
    import json
    import urllib.request

    req = urllib.request.Request(f"{stack.prefect_api_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Basic "
                                          + base64.b64encode(stack.auth_string.encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def test_prefect_flow_and_task_runs_are_completed_with_stage_logs_and_the_rerun_is_cached(stack, pipeline):
    for name in ("prep", "pretrain", "eval", "release", "prep-again"):
        fr = pipeline[name][0]
        tasks = _api_post(stack, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [str(fr.id)]}}})
        assert tasks and all(t["state"]["type"] == "COMPLETED" for t in tasks), name
        assert stack.api_get(f"/flow_runs/{fr.id}")["state"]["type"] == "COMPLETED"
        if name != "prep-again":  # the job's own lines, forwarded to the flow run's logs (the UI's Logs tab)
            logs = _api_post(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [str(fr.id)]}}, "limit": 200})
            assert any(f"stage {name} finished" in entry["message"] for entry in logs), (name, logs[-5:])
    again = pipeline["prep-again"][1]  # the flow's MLflow run: the same dataset, no stage run (cached on S3)
    assert again.data.tags["moeflow.dataset_uri"] == pipeline["prep"][1].outputs["dataset"]
    print(f"stack pipeline: {pipeline['seconds']:.0f}s")
