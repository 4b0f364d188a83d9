"""Kubernetes manifests of a stage: each stage runs as a batch/v1 Job (an Indexed Job + headless Service
for several nodes). `render_manifests` turns a JobSpec into plain manifests (dicts); `KubernetesLauncher`
(infra/launch/kubernetes.py) submits them.

What a rendered Job carries, and why:
- the container runs `moeflow-job <stage> --config URI`; with several processes or nodes it runs torchrun
  through `python -m infra.launch.torchrun_wrapper ...` (see that module), which keeps the job's own exit
  code (torchrun itself exits 1 whatever its workers returned);
- settings travel as plain `MOEFLOW_*` variables; S3 and MLflow credentials only as `secretKeyRef`s to
  `settings.kubernetes.credentials_secret`, never as values;
- `nvidia.com/gpu` limits, the node selector and tolerations of the settings (plus the usual
  `nvidia.com/gpu` taint toleration for GPU jobs), `/dev/shm` as a memory-backed emptyDir, `/tmp` as
  the only writable path (read-only root filesystem);
- the Pod Security Standards "restricted" profile: non-root, no privilege escalation, every capability
  dropped, RuntimeDefault seccomp; no service-account token (the job never calls the API);
- `backoffLimit` plus a `podFailurePolicy` that fails the Job at once on the job's own "retrying cannot
  help" exit codes (`EXIT_BAD_INPUT`, `EXIT_DIVERGED`) and does not count disruptions (preemption,
  node drain) against the backoff limit; `activeDeadlineSeconds`; `ttlSecondsAfterFinished`;
- labels tying the Job to its stage, the Prefect flow run and the MLflow run (`LABEL_*`), and
  annotations with its config and result URIs.

Multi-node: `completionMode: Indexed`, one pod per node; the pod of index i has the hostname `<job>-i`
under the headless Service `<job>`, runs torchrun with `--node-rank $(JOB_COMPLETION_INDEX)` and meets
the others at `<job>-0.<job>:29500`. The launcher creates the Service after the Job, owned by it, so it
goes away with the Job (TTL, deletion).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import yaml

from infra.contract import EXIT_BAD_INPUT, EXIT_DIVERGED, JOB_ENTRY_MODULE, LABEL_STAGE, JobSpec, Resources
from infra.redact import has_credentials
from infra.settings import Settings

CONTAINER = "job"
GPU_RESOURCE = "nvidia.com/gpu"
RDZV_PORT = 29500
FAIL_FAST_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_DIVERGED)
RUN_AS_UID = 1000  # the `moeflow` user of infra/docker/Dockerfile
MAX_JOB_NAME = 52  # room for the "-<index>" hostname suffix of Indexed Jobs within 63 characters

LABEL_JOB = "moeflow.dev/job"
ANNOTATION_CONFIG = "moeflow.dev/config-uri"
ANNOTATION_RESULT = "moeflow.dev/result-uri"

# Environment variable -> key in the credentials Secret. Optional refs: a cluster using IAM roles for
# service accounts has no S3 keys, an MLflow server without auth has no MLflow ones.
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


# --------------------------------------------------------------------------------------------- presets
def preset_resources(gpus: int, nodes: int = 1) -> Resources:
    """Per-node requests of the GPU presets: 8 CPU cores and 64 GiB per GPU, one process per GPU;
    2 cores and 8 GiB for a CPU-only job. docs/cluster.md shows the table."""
    if gpus < 0 or nodes < 1:
        raise ValueError(f"gpus must be >= 0 and nodes >= 1 (got gpus={gpus}, nodes={nodes})")
    if gpus == 0:
        return Resources(cpus=2, memory_gb=8, gpus=0, procs_per_node=1, nodes=nodes)
    return Resources(cpus=8 * gpus, memory_gb=64 * gpus, gpus=gpus, procs_per_node=gpus, nodes=nodes)


def shm_size_mib(r: Resources) -> int:
    """/dev/shm limit: a quarter of the pod's memory (it counts against the memory limit), >= 1 GiB."""
    return max(1024, int(r.memory_gb * 1024) // 4)


# ---------------------------------------------------------------------------------------------- naming
def job_name(spec: JobSpec) -> str:
    """`spec.name` as a DNS-1035 label short enough for Indexed pod hostnames. A name that had to be
    changed (case, characters, length) gets a hash of the original, so distinct names stay distinct."""
    s = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = f"j-{s}".rstrip("-")
    if s == spec.name and len(s) <= MAX_JOB_NAME:
        return s
    digest = hashlib.sha256(spec.name.encode()).hexdigest()[:8]
    return f"{s[:MAX_JOB_NAME - 9].rstrip('-')}-{digest}"


def label_value(value: str) -> str:
    """A label value (<= 63 chars of [-A-Za-z0-9_.], alphanumeric at both ends) from any string."""
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", v)


def _check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"JobSpec.labels: {key!r} is not a valid Kubernetes label key "
                         "(optional DNS prefix + '/' + up to 63 of [-A-Za-z0-9_.])")
    return key


# ------------------------------------------------------------------------------------------ rendering
def _cpu(cores: float) -> str:
    return str(int(cores)) if float(cores).is_integer() else f"{round(cores * 1000)}m"


def _mem(mib: int) -> str:
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _uses_torchrun(r: Resources) -> bool:
    return r.procs_per_node > 1 or r.nodes > 1


def job_command(spec: JobSpec, name: str) -> list[str]:
    """The container command: `moeflow-job`, or torchrun (through infra/launch/torchrun_wrapper.py) for several
    processes."""
    r = spec.resources
    job = [spec.stage, "--config", spec.config_uri]
    if not _uses_torchrun(r):
        return ["moeflow-job", *job]
    if r.nodes == 1:
        rdzv = ["--standalone", "--nnodes", "1"]
    else:
        rdzv = ["--nnodes", str(r.nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)",
                "--master-addr", f"{name}-0.{name}", "--master-port", str(RDZV_PORT)]
    return ["python", "-m", "infra.launch.torchrun_wrapper", *rdzv,
            "--nproc-per-node", str(r.procs_per_node), "-m", JOB_ENTRY_MODULE, *job]


def _env(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    if clash := sorted(set(spec.env) & set(SECRET_ENV)):
        raise ValueError(f"JobSpec.env sets {clash}: credentials come only from the Secret "
                         f"{settings.kubernetes.credentials_secret!r}, never as values")
    plain: dict[str, str | None] = {
        "MOEFLOW_STORE_URI": settings.store_uri,
        "MOEFLOW_TRACKING_URI": settings.tracking_uri,
        # a file:// artifact root (the embedded default) means nothing inside a pod
        "MOEFLOW_ARTIFACT_URI": None if str(settings.artifact_uri).startswith("file:") else settings.artifact_uri,
        "MOEFLOW_EXPERIMENT": settings.experiment,
        "MOEFLOW_S3__ENDPOINT_URL": settings.s3.endpoint_url,
        "MOEFLOW_S3__REGION": settings.s3.region,
        "MOEFLOW_S3__ADDRESSING_STYLE": settings.s3.addressing_style,
        "MOEFLOW_HOME": "/tmp/moeflow",  # /tmp is the pod's only writable path
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        **spec.env,
    }
    secret = settings.kubernetes.credentials_secret
    # A URI carrying a password (http://user:pw@mlflow/) never becomes a plain value: the pod reads it from
    # the credentials Secret under the variable's own name (create it with that key).
    env: list[dict[str, Any]] = [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} if has_credentials(str(v))
        else {"name": k, "value": str(v)} for k, v in plain.items() if v is not None]
    if spec.resources.nodes > 1:  # the job controller sets it too; declared so that $(...) expands for sure
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for var, key in SECRET_ENV.items()]
    return env


def _labels(spec: JobSpec, name: str) -> dict[str, str]:
    labels = {_check_label_key(k): label_value(v) for k, v in spec.labels.items()}
    labels.update({  # ours last: the pod selector relies on LABEL_JOB
        "app.kubernetes.io/name": "moeflow",
        "app.kubernetes.io/component": "stage-job",
        "app.kubernetes.io/managed-by": "moeflow",
        LABEL_STAGE: label_value(spec.stage),
        LABEL_JOB: name,
    })
    return labels


def _tolerations(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in settings.kubernetes.tolerations]
    if spec.resources.gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def render_manifests(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    """The Job for `spec` (an Indexed Job followed by its headless Service when `nodes > 1`)."""
    k = settings.kubernetes
    r = spec.resources
    name = job_name(spec)
    labels = _labels(spec, name)
    meta = {"name": name, "namespace": k.namespace, "labels": labels}
    requests = {"cpu": _cpu(r.cpus), "memory": _mem(int(r.memory_gb * 1024))}
    limits = {"memory": requests["memory"]}
    if r.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(r.gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or k.image,
        "command": job_command(spec, name),
        "env": _env(spec, settings),
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mem(shm_size_mib(r))}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if tolerations := _tolerations(spec, settings):
        pod["tolerations"] = tolerations
    job_spec: dict[str, Any] = {
        "backoffLimit": k.backoff_limit,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(FAIL_FAST_EXIT_CODES)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "activeDeadlineSeconds": math.ceil(spec.timeout_s) if spec.timeout_s else k.active_deadline_seconds,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    manifests: list[dict[str, Any]] = []
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**meta, "annotations": {ANNOTATION_CONFIG: spec.config_uri, ANNOTATION_RESULT: spec.result_uri}},
        "spec": job_spec,
    }
    manifests.append(job)
    if r.nodes > 1:
        job_spec.update(completionMode="Indexed", completions=r.nodes, parallelism=r.nodes)
        pod["subdomain"] = name
        container["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}]
        manifests.append({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": "None",
                "selector": {LABEL_JOB: name},
                "publishNotReadyAddresses": True,  # rendezvous DNS names exist before pods are Ready
                "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
            },
        })
    return json.loads(json.dumps(manifests))  # no shared sub-dicts (no YAML anchors, no aliasing)



# --------------------------------------------------------------------------------- `moeflow k8s render`
def render_stage(stage: str, resources: Resources, settings: Settings, *, fingerprint: str, title: str) -> str:
    """The manifests a flow would submit for `stage` on `resources`, as YAML after a comment header.

    The config and result URIs are deterministic placeholders under the store URI, named by a hash of `stage`
    and `fingerprint` (the text the resources came from), and the header says so: a flow uploads the
    validated job config there before it submits. `title` is the header's first line.
    """
    digest = hashlib.sha256(f"{stage}\0{fingerprint}".encode()).hexdigest()[:12]
    base = f"{str(settings.store_uri).rstrip('/')}/k8s-render/{stage}-{digest}"
    spec = JobSpec(stage=stage, name=f"{stage}-{digest}", config_uri=f"{base}/config.json",
                   result_uri=f"{base}/result.json", resources=resources)
    manifests = render_manifests(spec, settings)
    header = [
        f"# {title}",
        f"# {resources.nodes} node(s) x {resources.gpus} GPU(s), {resources.procs_per_node} process(es) per node",
        f"# The config URI is a deterministic placeholder under the store URI: {spec.config_uri}",
        "# (a flow uploads the validated job config there before it submits these manifests).",
    ]
    if not str(settings.store_uri).startswith("s3://"):
        header.append(f"# warning: store_uri {settings.store_uri} is a local path, which pods cannot read.")
    if not str(settings.tracking_uri).startswith(("http://", "https://")):
        header.append(f"# warning: tracking_uri {settings.tracking_uri} is no MLflow server pods can reach.")
    docs = [yaml.safe_dump(m, sort_keys=False) for m in manifests]
    return "\n".join(header) + "\n---\n" + "---\n".join(docs)
