"""Rendered stage Jobs: valid against the official Kubernetes schemas (kubernetes-validate, strict, oldest
supported 1.29 and the newest it ships) and carrying what a GPU training job needs, asserted field by field.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from pss import restricted_violations

from flows.cli import render_cli
from infra.contract import EXIT_BAD_INPUT, EXIT_DIVERGED, LABEL_FLOW_RUN, LABEL_MLFLOW_RUN, LABEL_STAGE, JobSpec
from infra.launch.k8s_render import (
    ANNOTATION_CONFIG,
    ANNOTATION_RESULT,
    GPU_RESOURCE,
    LABEL_JOB,
    SECRET_ENV,
    job_name,
    preset_resources,
    render_manifests,
)

VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
FLOW_RUN = "6f1c9a3e-2b7d-4c1a-9e55-0d2f8b7a4c11"
MLFLOW_RUN = "a3f9c0d2e4b64f7e9d1c2b3a4f5e6d7c"


def pretrain_spec(settings, gpus: int, nodes: int = 1, **kw) -> JobSpec:
    return JobSpec(stage="pretrain", name="pretrain-7c1e0f2a9b", config_uri="s3://moeflow/runs/p/config.json",
                   result_uri="s3://moeflow/runs/p/RESULT.json", resources=preset_resources(gpus, nodes),
                   labels={LABEL_FLOW_RUN: FLOW_RUN, LABEL_MLFLOW_RUN: MLFLOW_RUN}, **kw)


def validate_all(manifests: list[dict]) -> None:
    for m in manifests:
        for version in VERSIONS:
            kubernetes_validate.validate(m, version, strict=True)


def pod_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod_of(job)["containers"][0]["env"]}


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 2)], ids=["1gpu", "8gpu", "2x8gpu"])
def test_pretraining_manifests_validate_against_the_kubernetes_schemas(k8s_settings, gpus, nodes):
    manifests = render_manifests(pretrain_spec(k8s_settings, gpus, nodes), k8s_settings)
    assert [m["kind"] for m in manifests] == (["Job", "Service"] if nodes > 1 else ["Job"])
    validate_all(manifests)


def test_the_schema_check_catches_a_broken_manifest(k8s_settings):
    job = render_manifests(pretrain_spec(k8s_settings, 1), k8s_settings)[0]
    broken = copy.deepcopy(job)
    pod_of(broken)["containers"][0]["securityContext"]["runAsNonRot"] = True  # a typo strict mode must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29", strict=True)
    broken = copy.deepcopy(job)
    broken["spec"]["podFailurePolicy"]["rules"][0]["action"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29", strict=True)


def test_single_gpu_job_carries_security_gpu_shm_failure_policy_and_labels(k8s_settings):
    spec = pretrain_spec(k8s_settings, 1)
    (job,) = render_manifests(spec, k8s_settings)
    pod = pod_of(job)
    (c,) = pod["containers"]

    assert c["command"] == ["moeflow-job", "pretrain", "--config", spec.config_uri]
    assert c["image"] == k8s_settings.kubernetes.image
    # Pod Security Standards, restricted profile
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    # GPUs, memory, shared memory
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", GPU_RESOURCE: "1"},
                              "limits": {"memory": "64Gi", GPU_RESOURCE: "1"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # scheduling
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"},
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
    ]
    # failure handling and lifetime
    s = job["spec"]
    assert pod["restartPolicy"] == "Never"
    assert s["backoffLimit"] == k8s_settings.kubernetes.backoff_limit
    assert s["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In",
                                              "values": [EXIT_BAD_INPUT, EXIT_DIVERGED]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}
    assert s["activeDeadlineSeconds"] == k8s_settings.kubernetes.active_deadline_seconds
    assert s["ttlSecondsAfterFinished"] == k8s_settings.kubernetes.ttl_seconds_after_finished
    assert "completionMode" not in s
    # ties to Prefect and MLflow
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[LABEL_FLOW_RUN] == FLOW_RUN and labels[LABEL_MLFLOW_RUN] == MLFLOW_RUN
        assert labels[LABEL_STAGE] == "pretrain" and labels[LABEL_JOB] == job["metadata"]["name"]
    assert job["metadata"]["annotations"] == {ANNOTATION_CONFIG: spec.config_uri, ANNOTATION_RESULT: spec.result_uri}
    assert job["metadata"]["namespace"] == "moeflow"


def test_eight_gpu_job_runs_torchrun_with_a_process_per_gpu(k8s_settings):
    (job,) = render_manifests(pretrain_spec(k8s_settings, 8), k8s_settings)
    c = pod_of(job)["containers"][0]
    assert c["command"] == ["python", "-m", "infra.launch.torchrun_wrapper", "--standalone", "--nnodes", "1",
                            "--nproc-per-node", "8", "-m", "flows.job", "pretrain", "--config",
                            "s3://moeflow/runs/p/config.json"]
    assert c["resources"]["limits"] == {"memory": "512Gi", GPU_RESOURCE: "8"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}} in pod_of(job)["volumes"]


def test_two_node_job_is_indexed_with_a_headless_service_and_rendezvous_at_pod_zero(k8s_settings):
    job, svc = render_manifests(pretrain_spec(k8s_settings, 8, nodes=2), k8s_settings)
    name = job["metadata"]["name"]
    pod = pod_of(job)
    c = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert pod["subdomain"] == svc["metadata"]["name"] == name
    assert c["command"][:3] == ["python", "-m", "infra.launch.torchrun_wrapper"]
    args = c["command"][3:]
    assert args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--nproc-per-node") + 1] == "8"
    assert args[args.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert args[args.index("--master-addr") + 1] == f"{name}-0.{name}"
    assert args[args.index("--master-port") + 1] == "29500"
    assert args[-5:] == ["-m", "flows.job", "pretrain", "--config", "s3://moeflow/runs/p/config.json"]
    assert env_of(job)["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert c["resources"]["limits"][GPU_RESOURCE] == "8"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: name}
    assert job["spec"]["template"]["metadata"]["labels"][LABEL_JOB] == name
    assert svc["spec"]["ports"] == [{"name": "rdzv", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]
    assert restricted_violations(pod) == []


def test_credentials_come_only_from_secret_references(k8s_settings):
    (job,) = render_manifests(pretrain_spec(k8s_settings, 1), k8s_settings)
    env = env_of(job)
    for var, key in SECRET_ENV.items():
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "moeflow-credentials", "key": key, "optional": True}
        assert "value" not in env[var]
    values = " ".join(e.get("value", "") for e in env.values())
    assert "AKIA-SECRET-ID" not in values and "very-secret-key" not in values  # the settings' keys stay home
    assert env["MOEFLOW_S3__ENDPOINT_URL"]["value"] == "http://minio.moeflow.svc:9000"
    assert env["MOEFLOW_TRACKING_URI"]["value"] == "http://mlflow.moeflow.svc:5000"

    leaky = pretrain_spec(k8s_settings, 1).model_copy(update={"env": {"AWS_SECRET_ACCESS_KEY": "oops"}})
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
        render_manifests(leaky, k8s_settings)


def test_uris_with_a_password_reach_the_job_only_through_the_secret(k8s_settings):
    with_pw = k8s_settings.model_copy(update={"tracking_uri": "http://user:tracking-pw@mlflow.moeflow.svc:5000",
                                              "artifact_uri": "s3://bucket/mlflow?token=artifact-pw"})
    (job,) = render_manifests(pretrain_spec(with_pw, 1), with_pw)
    env = env_of(job)
    for var in ("MOEFLOW_TRACKING_URI", "MOEFLOW_ARTIFACT_URI"):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "moeflow-credentials", "key": var}}}
    rendered = yaml.safe_dump(job)
    assert "tracking-pw" not in rendered and "artifact-pw" not in rendered


def test_labels_are_sanitized_and_bad_label_keys_refused(k8s_settings):
    spec = pretrain_spec(k8s_settings, 0).model_copy(update={"labels": {"team": "LM research/pretraining " * 5}})
    (job,) = render_manifests(spec, k8s_settings)
    value = job["metadata"]["labels"]["team"]
    assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum() and "/" not in value
    validate_all([job])
    bad = spec.model_copy(update={"labels": {"not a key": "x"}})
    with pytest.raises(ValueError, match="not a key"):
        render_manifests(bad, k8s_settings)


def test_job_names_become_short_distinct_dns_labels():
    def name(n: str) -> str:
        return job_name(JobSpec(stage="s", name=n, config_uri="c", result_uri="r"))

    assert name("pretrain-3f2a") == "pretrain-3f2a"
    long_a, long_b = "pretrain_" + "a" * 80, "pretrain_" + "a" * 79 + "b"
    for n in (name("Pretrain_RUN.1"), name(long_a), name("42-run")):
        assert len(n) <= 52 and n[0].isalpha() and all(ch.isalnum() or ch == "-" for ch in n) and n == n.lower()
    assert name(long_a) != name(long_b)
    assert name("Pretrain") != name("pretrain")


def test_a_spec_timeout_becomes_the_active_deadline(k8s_settings):
    (job,) = render_manifests(pretrain_spec(k8s_settings, 1, timeout_s=3600.5), k8s_settings)
    assert job["spec"]["activeDeadlineSeconds"] == 3601


def test_cpu_only_job_asks_for_no_gpu_and_tolerates_no_gpu_taint(k8s_settings):
    (job,) = render_manifests(pretrain_spec(k8s_settings, 0), k8s_settings)
    c = pod_of(job)["containers"][0]
    assert GPU_RESOURCE not in c["resources"]["limits"] and GPU_RESOURCE not in c["resources"]["requests"]
    assert all(t["key"] != GPU_RESOURCE for t in pod_of(job)["tolerations"])
    validate_all([job])


def test_render_cli_prints_valid_multi_document_yaml_with_a_placeholder_config_uri(k8s_settings, tmp_path):
    preset = tmp_path / "pretrain-h100.yaml"
    preset.write_text("model: {hidden_size: 2048}\ntrain: {steps: 1000}\n")
    out = render_cli("pretrain", str(preset), 8, 2, k8s_settings)

    assert out == render_cli("pretrain", str(preset), 8, 2, k8s_settings)  # deterministic
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["Job", "Service"]
    assert "&id" not in out and "*id" not in out  # plain YAML, no anchors for kubectl users to puzzle over
    validate_all(docs)
    config_uri = docs[0]["metadata"]["annotations"][ANNOTATION_CONFIG]
    assert config_uri.startswith(f"{k8s_settings.store_uri}/k8s-render/pretrain-")
    header = [ln for ln in out.splitlines() if ln.startswith("#")]
    assert any("placeholder" in ln for ln in header) and any(config_uri in ln for ln in header)
    assert pod_of(docs[0])["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "8"

    preset.write_text("model: {hidden_size: 4096}\n")  # another preset, another placeholder
    other = yaml.safe_load_all(render_cli("pretrain", str(preset), 8, 2, k8s_settings))
    assert next(d for d in other if d)["metadata"]["annotations"][ANNOTATION_CONFIG] != config_uri


def test_render_cli_takes_the_stage_resources_of_the_preset_and_flags_override_them(k8s_settings, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("prep: {resources: {cpus: 3}}\n"
                      "pretrain:\n  steps: 10\n  resources: {gpus: 4, procs_per_node: 4, cpus: 30, memory_gb: 200}\n")

    def job(**flags) -> dict:
        docs = [d for d in yaml.safe_load_all(render_cli("pretrain", str(preset), settings=k8s_settings, **flags)) if d]
        return docs[0]

    r = pod_of(job())["containers"][0]["resources"]
    assert r["requests"] == {"cpu": "30", "memory": "200Gi", GPU_RESOURCE: "4"}
    assert "completionMode" not in job()["spec"]
    two = job(nodes=2)  # same per-node layout, two nodes
    assert two["spec"]["completions"] == 2 and pod_of(two)["containers"][0]["resources"] == r
    eight = pod_of(job(gpus=8))["containers"][0]["resources"]  # the 8-GPU preset instead
    assert eight["requests"] == {"cpu": "64", "memory": "512Gi", GPU_RESOURCE: "8"}
    preset.write_text("pretrain: {resources: {gpus: -1}}\n")
    with pytest.raises(ValueError, match=r"p.yaml: pretrain.resources"):
        job()


def test_render_cli_names_the_file_it_cannot_use(k8s_settings, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        render_cli("pretrain", str(bad), 1, 1, k8s_settings)
    with pytest.raises(ValueError, match="missing.yaml"):
        render_cli("pretrain", str(tmp_path / "missing.yaml"), 1, 1, k8s_settings)


def test_torchrun_wrapper_exits_with_the_jobs_own_code():
    """torchrun alone exits 1 when a worker fails; the wrapper returns the code the worker reported."""
    worker = 'echo 3 > "$MOEFLOW_EXIT_CODE_FILE"; exit 3'
    proc = subprocess.run([sys.executable, "-m", "infra.launch.torchrun_wrapper", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "1", "--no-python", "sh", "-c", worker],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
