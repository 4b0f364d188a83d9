"""Kubernetes backend: each stage runs as a batch/v1 Job (an Indexed Job + headless Service for several nodes).

`render_manifests` turns a JobSpec into plain manifests (dicts), `KubernetesLauncher.run` submits them
with the kubernetes client, follows the Job while streaming its pods' logs, and reads the StageResult
the job leaves at `spec.result_uri`, exactly as the local backend does.

What a rendered Job carries, and why:
- the container runs `moeflow-job <stage> --config URI`; with several processes or nodes it runs torchrun
  through `python -m infra.launch.kubernetes torchrun ...` (see `torchrun_main`), which keeps the job's
  own exit code (torchrun itself exits 1 whatever its workers returned);
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

The launcher polls (every `poll_interval_s`) rather than watching: the Job for its Complete/Failed
condition and its pods for logs to stream and for pods stuck Pending. A pod that is still unschedulable
(or cannot pull its image, or lacks its Secret) after `settings.kubernetes.unschedulable_timeout_s`
fails the run with the scheduler's reason and the Job is deleted. Setting `cancel` deletes the Job with
foreground propagation. The API calls it makes are exactly those granted to the flow-runner Role of
the Helm chart (helm/moeflow/templates/rbac.yaml).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from infra.contract import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    JOB_ENTRY_MODULE,
    LABEL_FLOW_RUN,
    LABEL_STAGE,
    JobFailed,
    JobSpec,
    Launcher,
    LogFn,
    Resources,
    StageResult,
)
from infra.settings import Settings, get_settings

log = logging.getLogger(__name__)

CONTAINER = "job"
GPU_RESOURCE = "nvidia.com/gpu"
RDZV_PORT = 29500
FAIL_FAST_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_DIVERGED)
# Pods in these waiting states never start by themselves: treated like unschedulable pods.
STUCK_WAITING_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
RUN_AS_UID = 1000  # the `moeflow` user of infra/docker/Dockerfile
TAIL_LINES = 40
LOG_RESUME_MARGIN_S = 60  # a resumed log stream starts this much before the last line shown (clock skew)
MAX_LOG_RESUMES = 20  # per pod
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
# Set by the Prefect work pool's base job template (infra/k8s/base-job-template.json) in flow-run pods:
# stage Jobs are then owned by the flow-run pod, so cancelling the flow run in the UI removes them too.
OWNER_POD_ENV = ("MOEFLOW_OWNER_POD_NAME", "MOEFLOW_OWNER_POD_UID", "MOEFLOW_OWNER_POD_NAMESPACE")
EXIT_CODE_FILE_ENV = "MOEFLOW_EXIT_CODE_FILE"

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
    """The container command: `moeflow-job`, or torchrun (through `torchrun_main`) for several processes."""
    r = spec.resources
    job = [spec.stage, "--config", spec.config_uri]
    if not _uses_torchrun(r):
        return ["moeflow-job", *job]
    if r.nodes == 1:
        rdzv = ["--standalone", "--nnodes", "1"]
    else:
        rdzv = ["--nnodes", str(r.nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)",
                "--master-addr", f"{name}-0.{name}", "--master-port", str(RDZV_PORT)]
    return ["python", "-m", "infra.launch.kubernetes", "torchrun", *rdzv,
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
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in plain.items() if v is not None]
    if spec.resources.nodes > 1:  # the job controller sets it too; declared so that $(...) expands for sure
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    secret = settings.kubernetes.credentials_secret
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


def render_cli(stage: str, config_file: str, gpus: int | None = None, nodes: int | None = None,
               settings: Settings | None = None) -> str:
    """`moeflow k8s render`: the manifests a flow would submit for `stage` with a preset file, as YAML.

    Resources come from the stage's `resources:` section of the preset (a stage config file may have it at
    its top level); `--gpus` picks the GPU preset of that size instead (`preset_resources`) and `--nodes`
    sets the node count. The config URI is a placeholder (said so in the output): a flow uploads the
    validated job config there before it submits.
    """
    settings = settings or get_settings()
    try:
        text = Path(config_file).read_text()
        preset = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_file}: cannot read the preset: {exc}") from exc
    if not isinstance(preset, dict):
        raise ValueError(f"{config_file}: a preset is a YAML mapping, got {type(preset).__name__}")
    section = preset[stage] if isinstance(preset.get(stage), dict) else preset
    base = None
    if isinstance(section.get("resources"), dict):
        where = f"{stage}.resources" if section is not preset else "resources"
        try:
            base = Resources.model_validate(section["resources"])
        except ValueError as exc:
            raise ValueError(f"{config_file}: {where}: {exc}") from exc
    if gpus is not None:
        resources = preset_resources(gpus, nodes if nodes is not None else (base.nodes if base else 1))
    elif base is not None:
        resources = base if nodes is None else base.model_copy(update={"nodes": nodes})
    else:
        resources = preset_resources(0, nodes or 1)
    digest = hashlib.sha256(f"{stage}\0{text}".encode()).hexdigest()[:12]
    base = f"{str(settings.store_uri).rstrip('/')}/k8s-render/{stage}-{digest}"
    spec = JobSpec(stage=stage, name=f"{stage}-{digest}", config_uri=f"{base}/config.json",
                   result_uri=f"{base}/result.json", resources=resources)
    manifests = render_manifests(spec, settings)
    header = [
        f"# moeflow k8s render --stage {stage} --config {config_file}",
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


# ------------------------------------------------------------------------------------------- launcher
class _Api:
    """The handful of API calls the launcher makes, on plain dicts (`_preload_content=False`)."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.delete_options = client.V1DeleteOptions(propagation_policy="Foreground")

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    def create_job(self, body: dict) -> dict:
        return self._json(self.batch.create_namespaced_job(self.ns, body, _preload_content=False))

    def read_job(self, name: str) -> dict:
        return self._json(self.batch.read_namespaced_job(name, self.ns, _preload_content=False))

    def delete_job(self, name: str) -> None:
        self._json(self.batch.delete_namespaced_job(name, self.ns, propagation_policy="Foreground",
                                                    body=self.delete_options, _preload_content=False))

    def create_service(self, body: dict) -> dict:
        return self._json(self.core.create_namespaced_service(self.ns, body, _preload_content=False))

    def list_pods(self, selector: str) -> list[dict]:
        return self._json(self.core.list_namespaced_pod(self.ns, label_selector=selector,
                                                        _preload_content=False))["items"]

    def list_events(self, field_selector: str) -> list[dict]:
        return self._json(self.core.list_namespaced_event(self.ns, field_selector=field_selector,
                                                          _preload_content=False))["items"]

    def log_stream(self, pod: str, *, follow: bool = True, tail_lines: int | None = None,
                   since_seconds: int | None = None, timestamps: bool = False) -> Any:
        return self.core.read_namespaced_pod_log(pod, self.ns, container=CONTAINER, follow=follow,
                                                 tail_lines=tail_lines, since_seconds=since_seconds,
                                                 timestamps=timestamps, _preload_content=False)


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def _transient(exc: BaseException) -> bool:
    """API errors worth retrying: server-side errors, throttling, lost connections."""
    import urllib3

    status = _status(exc)
    return (status is not None and (status >= 500 or status == 429)) or isinstance(exc, urllib3.exceptions.HTTPError)


def _condition(obj: dict, kind: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _container_state(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return cs.get("state") or {}
    return {}


def _pod_name(pod: dict) -> str:
    return pod["metadata"]["name"]


def _node_index(pod: dict) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")


class KubernetesLauncher(Launcher):
    """Runs a JobSpec as a Kubernetes Job and returns its StageResult (see the module docstring).

    `api_client`: a `kubernetes.client.ApiClient`; by default the in-cluster configuration, else the
    local kubeconfig (loaded at the first `run`, so constructing a launcher needs no cluster).
    """

    name = "kubernetes"

    def __init__(self, settings: Settings | None = None, api_client: Any = None, poll_interval_s: float = 2.0,
                 *, log_drain_s: float = 15.0, max_api_errors: int = 10):
        self.settings = settings or get_settings()
        self._api_client = api_client
        self.poll_interval_s = poll_interval_s
        self.log_drain_s = log_drain_s
        self.max_api_errors = max_api_errors

    def _client(self) -> Any:
        if self._api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
                self._api_client = client.ApiClient()
            except config.ConfigException:
                self._api_client = config.new_client_from_config()
        return self._api_client

    def run(self, spec: JobSpec, *, on_log: LogFn | None = None,
            cancel: threading.Event | None = None) -> StageResult:
        flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by Prefect in a flow run's process
        if flow_run and LABEL_FLOW_RUN not in spec.labels:
            spec = spec.model_copy(update={"labels": {**spec.labels, LABEL_FLOW_RUN: flow_run}})
        if not str(self.settings.store_uri).startswith("s3://"):
            log.warning("store_uri %s is not s3://: the job's pods must share that path with this process",
                        self.settings.store_uri)
        api = _Api(self._client(), self.settings.kubernetes.namespace)
        job_run = _JobRun(self, api, spec, on_log)
        try:
            job_run.submit()
            return job_run.follow(cancel or threading.Event())
        except (KeyboardInterrupt, SystemExit):
            job_run.delete()  # this process is being stopped: take the job's GPUs back with it
            raise


class _JobRun:
    """One submitted Job: its log streams, its stuck-pod clocks and its outcome."""

    def __init__(self, launcher: KubernetesLauncher, api: _Api, spec: JobSpec, on_log: LogFn | None):
        self.launcher = launcher
        self.api = api
        self.spec = spec
        self.on_log = on_log
        self.manifests = render_manifests(spec, launcher.settings)
        self.name = self.manifests[0]["metadata"]["name"]
        self.multi = spec.resources.nodes > 1
        self.tails: dict[str, collections.deque[str]] = {}
        self.logs: dict[str, _PodLog] = {}
        self.stuck_since: dict[str, float] = {}
        self.lock = threading.Lock()
        self.deleted = False

    # -- submission
    def submit(self) -> None:
        from kubernetes.client.exceptions import ApiException

        job = self.manifests[0]
        if owner := self._owner_pod():
            job["metadata"]["ownerReferences"] = [owner]
        try:
            created = self.api.create_job(job)
        except ApiException as exc:
            if exc.status != 409:
                raise JobFailed(f"cannot create job {self.name} in {self.api.ns}: {exc.status} {exc.reason}: "
                                f"{_api_message(exc)}") from exc
            created = self._existing()
        self._emit(f"[k8s] job {self.api.ns}/{self.name} submitted")
        if self.multi:
            svc = self.manifests[1]
            svc["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": self.name,
                                                  "uid": created["metadata"]["uid"]}]
            try:
                self.api.create_service(svc)
            except ApiException as exc:
                if exc.status != 409:  # 409: the job was resubmitted or reattached, its Service is there
                    self.delete()
                    raise JobFailed(f"cannot create service {self.name}: {exc.status} {_api_message(exc)}") from exc

    def _owner_pod(self) -> dict | None:
        name, uid, ns = (os.environ.get(v) for v in OWNER_POD_ENV)
        if name and uid and ns == self.api.ns:
            return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}
        return None

    def _existing(self) -> dict:
        """The job name is taken: attach to the same job still running or done, replace a failed one."""
        existing = self.api.read_job(self.name)
        annotations = existing["metadata"].get("annotations") or {}
        if annotations.get(ANNOTATION_CONFIG) != self.spec.config_uri:
            raise JobFailed(f"job {self.api.ns}/{self.name} already exists for another config "
                            f"({annotations.get(ANNOTATION_CONFIG)}); pick another JobSpec.name")
        if not _condition(existing, "Failed"):
            self._emit(f"[k8s] job {self.name} already exists: following it")
            return existing
        self._emit(f"[k8s] job {self.name} failed before: deleting it and submitting again")
        self.api.delete_job(self.name)
        self._wait_gone()
        self.deleted = False
        return self.api.create_job(self.manifests[0])

    def _wait_gone(self, timeout_s: float = 300.0) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.api.read_job(self.name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            time.sleep(self.launcher.poll_interval_s)
        raise JobFailed(f"job {self.name}: the previous failed job was not deleted within {timeout_s:g}s")

    def delete(self) -> None:
        """Delete the Job and, through foreground propagation, its pods (and Service) first."""
        from kubernetes.client.exceptions import ApiException

        if self.deleted:
            return
        try:
            self.api.delete_job(self.name)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete job %s: %s", self.name, exc)
                return
        except Exception as exc:  # the API may be unreachable: TTL and the deadline still apply
            log.warning("could not delete job %s: %s", self.name, exc)
            return
        self.deleted = True

    # -- following
    def follow(self, stop: threading.Event) -> StageResult:
        from kubernetes.client.exceptions import ApiException

        errors = 0
        while True:
            if stop.is_set():
                self.delete()
                raise JobFailed(f"job {self.name} ({self.spec.stage}) cancelled; deleted the Job "
                                "(foreground propagation)", log_tail=self._tail())
            try:
                job = self.api.read_job(self.name)
                pods = self.api.list_pods(f"{LABEL_JOB}={self.name}")
                errors = 0
            except ApiException as exc:
                if exc.status == 404:
                    raise JobFailed(f"job {self.name} ({self.spec.stage}) was deleted while running",
                                    log_tail=self._tail()) from exc
                if not _transient(exc) or errors >= self.launcher.max_api_errors:
                    raise JobFailed(f"job {self.name}: Kubernetes API error {exc.status}: {_api_message(exc)}",
                                    log_tail=self._tail()) from exc
                errors += 1
                stop.wait(self.launcher.poll_interval_s)
                continue
            except Exception as exc:
                if not _transient(exc) or errors >= self.launcher.max_api_errors:
                    raise JobFailed(f"job {self.name}: lost the Kubernetes API: {exc}", log_tail=self._tail()) from exc
                errors += 1
                stop.wait(self.launcher.poll_interval_s)
                continue
            for pod in pods:
                self._stream(pod)
            self._check_stuck(pods)
            if _condition(job, "Complete"):
                self._drain()
                return self._result()
            if failed := _condition(job, "Failed"):
                self._drain()
                raise self._failure(failed, pods)
            stop.wait(self.launcher.poll_interval_s)

    def _emit(self, line: str, pod: str | None = None) -> None:
        if pod is not None:
            with self.lock:
                self.tails.setdefault(pod, collections.deque(maxlen=TAIL_LINES)).append(line)
        if self.on_log:
            self.on_log(line)

    def _tail(self, pod: str | None = None) -> list[str]:
        with self.lock:
            if pod is not None:
                return list(self.tails.get(pod, ()))
            return [line for t in self.tails.values() for line in t][-TAIL_LINES:]

    def _stream(self, pod: dict) -> None:
        """Follow the log of a pod whose container has started; resume a stream that broke (an idle
        connection closed by a load balancer, an API server restart) while the container still runs."""
        name = _pod_name(pod)
        state = _container_state(pod)
        plog = self.logs.get(name)
        if plog is None:
            if "running" not in state and "terminated" not in state:
                return  # no logs before the container starts
            index = _node_index(pod)
            plog = self.logs[name] = _PodLog(f"[node {index}] " if self.multi and index is not None else "")
        elif plog.thread is not None and (plog.thread.is_alive() or "running" not in state
                                          or plog.resumes >= MAX_LOG_RESUMES):
            return
        elif plog.thread is not None:
            plog.resumes += 1
            log.debug("log stream of pod %s ended while it runs: resuming (%d)", name, plog.resumes)
        plog.thread = threading.Thread(target=self._pump, args=(name, plog), name=f"logs-{name}", daemon=True)
        plog.thread.start()

    def _pump(self, pod: str, plog: _PodLog, follow: bool = True) -> None:
        """Stream a pod's log with timestamps, showing only lines newer than the last one shown."""
        since = None
        if plog.last_ns is not None:
            since = max(1, math.ceil(time.time() - plog.last_ns / 1e9) + LOG_RESUME_MARGIN_S)
        try:
            resp = self.api.log_stream(pod, follow=follow, since_seconds=since, timestamps=True)
        except Exception as exc:
            log.debug("no logs from pod %s: %s", pod, exc)
            return
        buf = b""
        try:
            while chunk := resp.read1(65536):
                *lines, buf = (buf + chunk).split(b"\n")
                for raw in lines:
                    self._line(pod, plog, raw)
            self._line(pod, plog, buf)
        except Exception as exc:  # the stream broke: `_stream` resumes it while the pod runs
            log.debug("log stream of pod %s ended: %s", pod, exc)
        finally:
            resp.release_conn()

    def _line(self, pod: str, plog: _PodLog, raw: bytes) -> None:
        stamp, _, text = raw.decode("utf-8", "replace").partition(" ")
        ns = _timestamp_ns(stamp)
        if ns is None:  # not a timestamped line: show it whole
            text, ns = f"{stamp} {text}" if text else stamp, plog.last_ns
        elif plog.last_ns is not None and ns <= plog.last_ns:
            return  # already shown before the stream was resumed
        plog.last_ns = ns
        for piece in text.split("\r"):  # progress bars redraw with carriage returns
            if piece := piece.rstrip():
                self._emit(plog.prefix + piece, pod)

    def _drain(self) -> None:
        """The job ended: let the streams finish, then read what a broken stream may have missed."""
        deadline = time.monotonic() + self.launcher.log_drain_s
        for plog in self.logs.values():
            if plog.thread is not None:
                plog.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for name, plog in self.logs.items():
            if plog.thread is None or not plog.thread.is_alive():
                self._pump(name, plog, follow=False)

    def _check_stuck(self, pods: list[dict]) -> None:
        now = time.monotonic()
        timeout = self.launcher.settings.kubernetes.unschedulable_timeout_s
        for pod in pods:
            name = _pod_name(pod)
            stuck = _stuck_reason(pod)
            if stuck is None:
                self.stuck_since.pop(name, None)
                continue
            reason, message = stuck
            if name not in self.stuck_since:
                self.stuck_since[name] = now
                self._emit(f"[k8s] pod {name} is {reason}: {message} (failing after {timeout:g}s)")
            elif now - self.stuck_since[name] >= timeout:
                if reason == "Unschedulable":
                    message = self._scheduler_message(name) or message
                self.delete()
                raise JobFailed(f"job {self.name} ({self.spec.stage}): pod {name} still {reason} after "
                                f"{timeout:g}s: {message}; deleted the Job", log_tail=self._tail())

    def _scheduler_message(self, pod: str) -> str | None:
        """The latest FailedScheduling event of the pod: the scheduler's own words."""
        try:
            events = self.api.list_events(f"involvedObject.kind=Pod,involvedObject.name={pod},reason=FailedScheduling")
        except Exception as exc:
            log.debug("cannot list events of %s: %s", pod, exc)
            return None

        def when(e: dict) -> str:
            return e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp") or ""

        events = [e for e in events if e.get("message")]
        return max(events, key=when)["message"] if events else None

    def _failure(self, condition: dict, pods: list[dict]) -> JobFailed:
        failed = [p for p in pods if _container_state(p).get("terminated", {}).get("exitCode", 0) != 0]
        first = min(failed, key=lambda p: (_container_state(p)["terminated"].get("finishedAt") or "", _pod_name(p)),
                    default=None)
        exit_code, where, tail = None, "", self._tail()
        if first is not None:
            pod = _pod_name(first)
            exit_code = _container_state(first)["terminated"]["exitCode"]
            where = f"; pod {pod} exited with code {exit_code}"
            tail = self._tail(pod) or self._fetch_tail(pod) or tail
        reason = condition.get("reason") or "Failed"
        message = condition.get("message") or ""
        return JobFailed(f"job {self.name} ({self.spec.stage}) failed: {reason}: {message}{where}",
                         exit_code=exit_code, log_tail=tail)

    def _fetch_tail(self, pod: str) -> list[str]:
        try:
            resp = self.api.log_stream(pod, follow=False, tail_lines=TAIL_LINES)
            try:
                return [ln for ln in resp.data.decode("utf-8", "replace").splitlines() if ln.strip()]
            finally:
                resp.release_conn()
        except Exception:
            return []

    def _result(self) -> StageResult:
        from infra import storage

        try:
            return StageResult.model_validate(storage.read_json(self.spec.result_uri))
        except Exception as exc:
            raise JobFailed(f"job {self.name} ({self.spec.stage}) completed but left no readable result at "
                            f"{self.spec.result_uri}: {exc}", exit_code=0, log_tail=self._tail()) from exc


class _PodLog:
    """The log stream of one pod: its thread, its prefix, and the timestamp of the last line shown."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.thread: threading.Thread | None = None
        self.last_ns: int | None = None
        self.resumes = 0


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def _timestamp_ns(stamp: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 timestamp as the kubelet writes them, else None."""
    m = _TIMESTAMP.match(stamp)
    if not m:
        return None
    when = datetime.fromisoformat(m[1] + ("+00:00" if m[3] == "Z" else m[3]))
    return int(when.timestamp()) * 10**9 + int((m[2] or "").ljust(9, "0"))


def _stuck_reason(pod: dict) -> tuple[str, str] | None:
    """(reason, message) of a pod that will not start by itself, else None."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return "Unschedulable", c.get("message") or "no reason given"
    waiting = _container_state(pod).get("waiting") or {}
    if waiting.get("reason") in STUCK_WAITING_REASONS:
        return waiting["reason"], waiting.get("message") or ""
    return None


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except Exception:
        return str(getattr(exc, "body", "") or exc)


# -------------------------------------------------------------------------------- torchrun wrapper
def torchrun_main(argv: list[str]) -> int:
    """`python -m infra.launch.kubernetes torchrun ARGS...`: torchrun that keeps the job's exit code.

    torchrun exits 1 whenever a worker fails, which would hide `EXIT_BAD_INPUT`/`EXIT_DIVERGED` from the
    podFailurePolicy. Workers get `MOEFLOW_EXIT_CODE_FILE`; `moeflow-job` writes its non-zero exit code
    there, and this wrapper exits with it. SIGTERM/SIGINT are forwarded to torchrun, which forwards
    them to its workers (the job's own handler then marks its MLflow run killed).
    """
    code_file = Path(tempfile.gettempdir()) / f"moeflow-exit-code-{os.getpid()}"
    code_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv],
                            env={**os.environ, EXIT_CODE_FILE_ENV: str(code_file)})

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if rc != 0:
        try:
            rc = int(code_file.read_text().strip())
        except (OSError, ValueError):
            pass
    code_file.unlink(missing_ok=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "torchrun":
        print("usage: python -m infra.launch.kubernetes torchrun [torchrun arguments...]", file=sys.stderr)
        return 2
    return torchrun_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
