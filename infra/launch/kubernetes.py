"""Kubernetes backend: `KubernetesLauncher.run` submits the manifests of a JobSpec (infra/launch/k8s_render.py)
with the kubernetes client (infra/launch/k8s_api.py), follows the Job while streaming its pods' logs, and
reads the StageResult the job leaves at `spec.result_uri`, exactly as the local backend does.

A Job of several nodes comes with a headless Service: the launcher creates it after the Job, owned by it,
so it goes away with the Job (TTL, deletion). A Job started from a flow-run pod is owned by that pod
(`OWNER_POD_ENV`), so cancelling the flow run in the UI removes it too.

The launcher polls (every `poll_interval_s`) rather than watching: the Job for its Complete/Failed
condition and its pods for logs to stream and for pods stuck Pending. A pod that is still unschedulable
(or cannot pull its image, or lacks its Secret) after `settings.kubernetes.unschedulable_timeout_s`
fails the run with the scheduler's reason and the Job is deleted. Setting `cancel` deletes the Job with
foreground propagation. The API calls it makes are exactly those granted to the flow-runner Role of
the Helm chart (helm/moeflow/templates/rbac.yaml).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import time
from datetime import datetime
from typing import Any

from infra.contract import LABEL_FLOW_RUN, JobFailed, JobSpec, Launcher, LogFn, StageResult
from infra.launch.k8s_api import KubeApi, api_message, is_transient
from infra.launch.k8s_render import ANNOTATION_CONFIG, CONTAINER, LABEL_JOB, render_manifests
from infra.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Pods in these waiting states never start by themselves: treated like unschedulable pods.
STUCK_WAITING_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
TAIL_LINES = 40
LOG_RESUME_MARGIN_S = 60  # a resumed log stream starts this much before the last line shown (clock skew)
MAX_LOG_RESUMES = 20  # per pod

# Set by the Prefect work pool's base job template (infra/k8s/base-job-template.json) in flow-run pods:
# stage Jobs are then owned by the flow-run pod, so cancelling the flow run in the UI removes them too.
OWNER_POD_ENV = ("MOEFLOW_OWNER_POD_NAME", "MOEFLOW_OWNER_POD_UID", "MOEFLOW_OWNER_POD_NAMESPACE")


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
        api = KubeApi(self._client(), self.settings.kubernetes.namespace, CONTAINER)
        job_run = _JobRun(self, api, spec, on_log)
        try:
            job_run.submit()
            return job_run.follow(cancel or threading.Event())
        except (KeyboardInterrupt, SystemExit):
            job_run.delete()  # this process is being stopped: take the job's GPUs back with it
            raise


class _JobRun:
    """One submitted Job: its log streams, its stuck-pod clocks and its outcome."""

    def __init__(self, launcher: KubernetesLauncher, api: KubeApi, spec: JobSpec, on_log: LogFn | None):
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
                                f"{api_message(exc)}") from exc
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
                    raise JobFailed(f"cannot create service {self.name}: {exc.status} {api_message(exc)}") from exc

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
                if not is_transient(exc) or errors >= self.launcher.max_api_errors:
                    raise JobFailed(f"job {self.name}: Kubernetes API error {exc.status}: {api_message(exc)}",
                                    log_tail=self._tail()) from exc
                errors += 1
                stop.wait(self.launcher.poll_interval_s)
                continue
            except Exception as exc:
                if not is_transient(exc) or errors >= self.launcher.max_api_errors:
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
