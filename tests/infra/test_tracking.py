"""MLflow tracking: parent/child runs across processes, batched metrics, PNG artifacts, git tags —
on the embedded SQLite store, and against a real `mlflow server` on loopback with S3 (moto) artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from infra.tracking import PARENT_RUN_ENV, create_run, start_run, system_metrics


def _client():
    from mlflow import MlflowClient

    from infra.settings import get_settings

    return MlflowClient(tracking_uri=get_settings().tracking_uri)


def test_child_run_in_another_process_has_the_parent(moeflow_home):
    with start_run("flow") as parent:
        code = (
            "import os; from infra.tracking import create_run, PARENT_RUN_ENV;"
            "t = create_run('job', parent_run_id=os.environ[PARENT_RUN_ENV]); t.end(); print(t.run_id)"
        )
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, PARENT_RUN_ENV: parent.run_id},
                             capture_output=True, text=True, timeout=120, check=True)
        child_id = out.stdout.strip().splitlines()[-1]
    child = _client().get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.info.status == "FINISHED"
    assert "moeflow.git_commit" in child.data.tags


def test_metrics_are_batched_and_all_arrive(moeflow_home):
    tracker = create_run("metrics")
    tracker._flush_s = 3600  # only the size trigger and the final flush may send
    for step in range(450):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    assert len(tracker._buf) < 200  # flushed on size, never holding everything
    tracker.end()
    history = _client().get_metric_history(tracker.run_id, "loss")
    assert len(history) == 450
    assert sorted(m.step for m in history) == list(range(450))


def test_failed_block_marks_run_failed(moeflow_home):
    with pytest.raises(RuntimeError):
        with start_run("boom") as t:
            raise RuntimeError("boom")
    assert _client().get_run(t.run_id).info.status == "FAILED"


def test_figure_is_logged_as_png(moeflow_home):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with start_run("plots") as t:
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        t.log_figure(fig, "plots/curve.png")
    files = [f.path for f in _client().list_artifacts(t.run_id, "plots")]
    assert files == ["plots/curve.png"]


@pytest.fixture
def mlflow_server(s3_env, tmp_path, patch_env, free_port):
    """A real `mlflow server` on loopback: SQLite backend, artifacts proxied to the moto S3 bucket."""
    bucket = s3_env.removeprefix("s3://").split("/")[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": os.environ["MOEFLOW_S3__ENDPOINT_URL"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:]) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise TimeoutError("mlflow server did not answer within 90 s")
    try:
        with patch_env(MOEFLOW_TRACKING_URI=url, MOEFLOW_ARTIFACT_URI=None):
            yield bucket
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tracking_server_with_s3_artifacts(mlflow_server):
    import boto3

    from infra.settings import get_settings

    with start_run("flow") as parent:
        with start_run("job", parent_run_id=parent.run_id) as child:
            child.log_metrics({"loss": 2.5}, step=1)
            child.log_text("hello", "notes/hello.txt")
    run = _client().get_run(child.run_id)
    assert run.data.metrics["loss"] == 2.5
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    s3 = get_settings().s3
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region)
            .list_objects_v2(Bucket=mlflow_server).get("Contents", [])]
    assert any(k.endswith("notes/hello.txt") for k in keys), keys


def test_keys_mlflow_rejects_are_made_safe(moeflow_home):
    with start_run("keys") as t:
        t.log_params({"gate": {"min": {"pass@1": 0.5}}})
        t.log_metrics({"eval/pass@1": 0.25})
    run = _client().get_run(t.run_id)
    assert run.data.params["gate.min.pass_at_1"] == "0.5"
    assert run.data.metrics["eval/pass_at_1"] == 0.25


def test_system_metrics_are_sampled_into_the_run_when_asked(moeflow_home):
    tracker = create_run("sysmetrics")
    with system_metrics(tracker, 0.5):
        time.sleep(2.0)
    tracker.end()
    names = set(_client().get_run(tracker.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= names, names
    quiet = create_run("no-sysmetrics")
    with system_metrics(quiet, 0):
        pass
    quiet.end()
    assert not [n for n in _client().get_run(quiet.run_id).data.metrics if n.startswith("system/")]
