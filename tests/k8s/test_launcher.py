"""KubernetesLauncher: submit, log streaming, success, failure, unschedulable pods and cancellation.

All of it runs against the local Kubernetes API fake of kube_fake.py, an HTTP server on 127.0.0.1: no
cluster can run on these machines. Each test scripts what the cluster does in `on_job_created`.
"""

from __future__ import annotations

import threading

import pytest
from kube_fake import FakeKube

from infra import storage
from infra.contract import EXIT_BAD_INPUT, LABEL_FLOW_RUN, JobFailed, JobSpec, Resources, StageResult
from infra.launch.k8s_render import LABEL_JOB, preset_resources, render_manifests
from infra.launch.kubernetes import TAIL_LINES, _timestamp_ns


def make_spec(settings, name="pretrain-0a1b2c", resources: Resources | None = None, **kw) -> JobSpec:
    base = f"{settings.store_uri}/runs/{name}"
    return JobSpec(stage="pretrain", name=name, config_uri=f"{base}/config.json", result_uri=f"{base}/RESULT.json",
                   resources=resources or preset_resources(1), **kw)


def write_result(spec: JobSpec, **metrics: float) -> StageResult:
    result = StageResult(stage=spec.stage, outputs={"checkpoint": f"{spec.result_uri}/../ckpt"}, metrics=metrics,
                         mlflow_run_id="4f0c2b", seconds=12.5)
    storage.write_json(spec.result_uri, result.model_dump(mode="json"))
    return result


def test_success_streams_logs_live_and_returns_the_stage_result(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings, labels={LABEL_FLOW_RUN: "9a7e2f8c-flow", "moeflow.dev/mlflow-run-id": "4f0c2b"})
    first_line_seen = threading.Event()
    lines: list[str] = []

    def on_log(line: str) -> None:
        lines.append(line)
        if line == "loading shards":
            first_line_seen.set()

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = k.add_pod(name)
        k.start(pod)
        k.log(pod, "loading shards")
        # the launcher must show a line while the pod still runs, not after it ended
        assert first_line_seen.wait(10), "first log line not streamed while the pod was running"
        k.log(pod, "step 1 loss 4.21", "step 2 loss 3.87")
        write_result(spec, loss=3.87)
        k.finish(pod, 0)
        k.complete(name)

    fake_kube.on_job_created = cluster
    result = launcher.run(spec, on_log=on_log)

    assert result.metrics == {"loss": 3.87} and result.mlflow_run_id == "4f0c2b"
    job_lines = [ln for ln in lines if not ln.startswith("[k8s]")]
    assert job_lines == ["loading shards", "step 1 loss 4.21", "step 2 loss 3.87"]
    created = [r.body for r in fake_kube.requests if (r.verb, r.resource) == ("create", "jobs")]
    assert len(created) == 1
    assert created[0]["metadata"]["labels"][LABEL_FLOW_RUN] == "9a7e2f8c-flow"
    assert fake_kube.deletions == []  # a finished job is left to its TTL


def test_a_dropped_log_stream_is_resumed_without_losing_or_repeating_lines(launcher, fake_kube: FakeKube,
                                                                          k8s_settings):
    spec = make_spec(k8s_settings)
    lines: list[str] = []
    third = threading.Event()

    def on_log(line: str) -> None:
        lines.append(line)
        if line == "step 3":
            third.set()

    def follows(k: FakeKube) -> list:
        return [r for r in k.requests if r.resource == "pods/log" and r.query.get("follow") == "true"]

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = k.add_pod(name)
        k.start(pod)
        k.log(pod, "step 1", "step 2", "step 3")
        assert third.wait(10)
        k.drop_log_streams(pod)  # e.g. a load balancer closing a connection idle during a checkpoint
        k.log(pod, "step 4")
        assert k.wait_for(lambda: len(follows(k)) >= 2), "the launcher did not resume the stream"
        k.log(pod, "step 5 [====>   ] 50%\rstep 5 [========] 100%")
        write_result(spec)
        k.finish(pod, 0)
        k.complete(name)

    fake_kube.on_job_created = cluster
    launcher.run(spec, on_log=on_log)

    assert [ln for ln in lines if not ln.startswith("[k8s]")] == [
        "step 1", "step 2", "step 3", "step 4", "step 5 [====>   ] 50%", "step 5 [========] 100%"]
    first, resumed = follows(fake_kube)[:2]
    assert first.query["timestamps"] == "true" and "sinceSeconds" not in first.query
    assert int(resumed.query["sinceSeconds"]) >= 1


def test_kubelet_timestamps_parse_to_nanoseconds():
    assert _timestamp_ns("2026-01-02T03:04:05.5Z") - _timestamp_ns("2026-01-02T03:04:05Z") == 500_000_000
    assert _timestamp_ns("2026-01-02T03:04:05.000000001+01:00") == _timestamp_ns("2026-01-02T02:04:05Z") + 1
    assert _timestamp_ns("hello") is None


def test_failure_raises_with_exit_code_and_last_log_lines(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = k.add_pod(name)
        k.start(pod)
        k.log(pod, *[f"step {i}" for i in range(100)])
        k.log(pod, "ConfigError: model.hidden_size must be divisible by num_attention_heads")
        k.finish(pod, EXIT_BAD_INPUT)
        k.fail(name, "PodFailurePolicy", f"Container job for pod moeflow/{pod} failed with exit code 3 "
                                         "matching FailJob rule at index 0")

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed) as err:
        launcher.run(spec)

    e = err.value
    assert e.exit_code == EXIT_BAD_INPUT
    assert "PodFailurePolicy" in str(e) and "exited with code 3" in str(e)
    assert e.log_tail[-1] == "ConfigError: model.hidden_size must be divisible by num_attention_heads"
    assert len(e.log_tail) == TAIL_LINES and "step 0" not in e.log_tail
    assert "--- last log lines ---" in str(e) and "step 99" in str(e)


def test_failed_pod_that_ended_before_streaming_still_gives_its_tail(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = k.add_pod(name)
        k.start(pod)
        k.log(pod, "Traceback (most recent call last):", "RuntimeError: CUDA error: out of memory")
        k.finish(pod, 1)
        k.fail(name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed) as err:
        launcher.run(spec)
    assert err.value.exit_code == 1
    assert err.value.log_tail[-1] == "RuntimeError: CUDA error: out of memory"
    assert "BackoffLimitExceeded" in str(err.value)


def test_unschedulable_pod_fails_after_the_timeout_with_the_scheduler_reason(launcher, fake_kube: FakeKube,
                                                                             k8s_settings):
    spec = make_spec(k8s_settings, resources=preset_resources(8))
    reason = ("0/6 nodes are available: 2 Insufficient nvidia.com/gpu, 4 node(s) didn't match Pod's node "
              "affinity/selector. preemption: 0/6 nodes are available: 6 Preemption is not helpful.")
    lines: list[str] = []

    def cluster(k: FakeKube, job: dict) -> None:
        pod = k.add_pod(job["metadata"]["name"])
        k.set_unschedulable(pod, "0/6 nodes are available", event_message=reason)

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed) as err:
        launcher.run(spec, on_log=lines.append)

    assert "Unschedulable" in str(err.value) and reason in str(err.value)  # the event's words, not the summary
    assert any("Unschedulable" in ln and "failing after" in ln for ln in lines)  # warned before giving up
    assert fake_kube.deletions == [(spec.name, "Foreground")] and not fake_kube.jobs
    events = [r for r in fake_kube.requests if r.resource == "events"]
    assert events and "reason=FailedScheduling" in events[0].query["fieldSelector"]


def test_pod_that_cannot_pull_its_image_fails_after_the_timeout(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)

    def cluster(k: FakeKube, job: dict) -> None:
        pod = k.add_pod(job["metadata"]["name"])
        with k.cond:
            k.pods[pod]["status"]["containerStatuses"] = [{
                "name": "job", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}}]

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed, match="ImagePullBackOff.*Back-off pulling image"):
        launcher.run(spec)
    assert fake_kube.deletions == [(spec.name, "Foreground")]


def test_cancel_deletes_the_job_with_foreground_propagation(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)
    cancel = threading.Event()

    def on_log(line: str) -> None:
        if line == "step 1":
            cancel.set()

    def cluster(k: FakeKube, job: dict) -> None:
        pod = k.add_pod(job["metadata"]["name"])
        k.start(pod)
        k.log(pod, "step 1")  # ...and never finishes by itself

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed, match="cancelled") as err:
        launcher.run(spec, on_log=on_log, cancel=cancel)

    assert fake_kube.deletions == [(spec.name, "Foreground")]
    delete = next(r for r in fake_kube.requests if r.verb == "delete")
    assert delete.query["propagationPolicy"] == "Foreground" and delete.body["propagationPolicy"] == "Foreground"
    assert not fake_kube.jobs and not fake_kube.pods
    assert err.value.log_tail == ["step 1"]


def test_multi_node_job_gets_an_owned_headless_service_and_per_node_logs(launcher, fake_kube: FakeKube,
                                                                         k8s_settings):
    spec = make_spec(k8s_settings, resources=preset_resources(8, nodes=2))
    lines: list[str] = []

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pods = [k.add_pod(name, index=i) for i in range(2)]
        for i, pod in enumerate(pods):
            k.start(pod)
            k.log(pod, f"rank {8 * i} ready")
        assert k.wait_for(lambda: name in k.services), "the launcher created no Service"
        write_result(spec, loss=2.5)
        for pod in pods:
            k.finish(pod, 0)
        k.complete(name)

    fake_kube.on_job_created = cluster
    result = launcher.run(spec, on_log=lines.append)

    assert result.metrics == {"loss": 2.5}
    assert {"[node 0] rank 0 ready", "[node 1] rank 8 ready"} <= set(lines)
    (svc,) = fake_kube.services.values()
    job = fake_kube.jobs[spec.name]
    assert svc["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": spec.name,
                                                   "uid": job["metadata"]["uid"]}]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {LABEL_JOB: spec.name}


def test_completed_job_without_a_result_is_a_failure(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = k.add_pod(name)
        k.start(pod)
        k.log(pod, "done")
        k.finish(pod, 0)
        k.complete(name)

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed, match="left no readable result") as err:
        launcher.run(spec)
    assert err.value.exit_code == 0 and err.value.log_tail == ["done"]


def test_resubmitting_a_failed_job_replaces_it_and_a_running_one_is_followed(launcher, fake_kube: FakeKube,
                                                                             k8s_settings):
    spec = make_spec(k8s_settings)
    attempts: list[str] = []

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        attempts.append(job["metadata"]["uid"])
        pod = k.add_pod(name)
        k.start(pod)
        if len(attempts) == 1:
            k.finish(pod, 1)
            k.fail(name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        write_result(spec, loss=1.0)
        k.finish(pod, 0)
        k.complete(name)

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed):
        launcher.run(spec)
    result = launcher.run(spec)  # the Prefect task's retry: same name, same config

    assert result.metrics == {"loss": 1.0} and len(attempts) == 2
    assert fake_kube.deletions == [(spec.name, "Foreground")]


def test_a_job_name_taken_by_another_config_is_refused(launcher, fake_kube: FakeKube, k8s_settings):
    spec = make_spec(k8s_settings)
    other = spec.model_copy(update={"config_uri": spec.config_uri.replace("config", "other")})
    existing = render_manifests(spec, k8s_settings)[0]  # still running, submitted for `spec`
    existing["metadata"]["uid"] = "u-1"
    existing["status"] = {}
    fake_kube.jobs[spec.name] = existing
    with pytest.raises(JobFailed, match="already exists for another config"):
        launcher.run(other)


def test_stage_jobs_are_owned_by_the_flow_run_pod(launcher, fake_kube: FakeKube, k8s_settings, monkeypatch):
    monkeypatch.setenv("MOEFLOW_OWNER_POD_NAME", "pipeline-run-7xk2p")
    monkeypatch.setenv("MOEFLOW_OWNER_POD_UID", "2b6f0d4e-uid")
    monkeypatch.setenv("MOEFLOW_OWNER_POD_NAMESPACE", "moeflow")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0c5d0e54-flow-run")
    spec = make_spec(k8s_settings)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobFailed):
        launcher.run(spec, cancel=cancel)
    body = fake_kube.requests[0].body
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod",
                                                    "name": "pipeline-run-7xk2p", "uid": "2b6f0d4e-uid"}]
    assert body["metadata"]["labels"][LABEL_FLOW_RUN] == "0c5d0e54-flow-run"
