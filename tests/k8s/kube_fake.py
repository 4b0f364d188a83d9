"""A local Kubernetes API fake, served over HTTP on 127.0.0.1 with `http.server`.

No Kubernetes cluster can run on the machines these tests run on (no Docker engine, no kind, no network),
so the launcher is tested against this fake instead. It speaks the real wire protocol the kubernetes
client uses, for exactly the endpoints `infra.launch.kubernetes.KubernetesLauncher` calls:

    POST   /apis/batch/v1/namespaces/{ns}/jobs             create (body validated against the official
                                                           schema like the API server would: 422 if not)
    GET    /apis/batch/v1/namespaces/{ns}/jobs/{name}      get
    DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}      delete; records the propagation policy, removes
                                                           the pods (then the Job, as foreground deletion
                                                           does) and the Services the Job owns
    POST   /api/v1/namespaces/{ns}/services                create (validated)
    GET    /api/v1/namespaces/{ns}/pods?labelSelector=     list, equality selectors
    GET    /api/v1/namespaces/{ns}/pods/{name}/log         log; `follow=true` streams with chunked
                                                           transfer encoding until the container ends
    GET    /api/v1/namespaces/{ns}/events?fieldSelector=   list, equality selectors on event fields

Nothing plays the job controller: a test scripts what the cluster does with `on_job_created` (called in a
thread with the created Job) and the helpers `add_pod`, `start`, `log`, `finish`, `set_unschedulable`,
`complete`, `fail`. Every request is recorded in `requests` as (verb, resource, name, query, body), with
the RBAC verb and resource it needs.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
CORE = re.compile(r"^/api/v1/namespaces/([^/]+)/(pods|services|events)(?:/([^/]+))?(/log)?$")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Request(NamedTuple):
    verb: str  # RBAC verb: create, get, list, watch, delete
    resource: str  # RBAC resource: jobs, pods, pods/log, services, events
    name: str | None
    query: dict[str, str]
    body: Any


class FakeKube:
    def __init__(self, namespace: str = "moeflow", schema_version: str = "1.29"):
        self.namespace = namespace
        self.schema_version = schema_version
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.events: list[dict] = []
        self.logs: dict[str, list[tuple[int, str]]] = {}  # pod -> [(time in ns, line)]
        self.drops: dict[str, int] = {}  # pod -> how many times its log streams were cut
        self.requests: list[Request] = []
        self.deletions: list[tuple[str, str | None]] = []  # (job name, propagationPolicy)
        self.errors: list[str] = []  # exceptions raised by scenario threads
        self.on_job_created: Callable[[FakeKube, dict], None] | None = None
        self.cond = threading.Condition()
        self.closing = False
        self.server: ThreadingHTTPServer | None = None

    # -- lifecycle
    def __enter__(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-kube", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.url))

    # -- what the cluster does (called by test scenarios)
    def add_pod(self, job_name: str, index: int | None = None) -> str:
        """A Pending pod of the Job, built from its template as the job controller would."""
        with self.cond:
            job = self.jobs[job_name]
            template = json.loads(json.dumps(job["spec"]["template"]))
            suffix = secrets.token_hex(3)[:5]
            name = f"{job_name}-{index}-{suffix}" if index is not None else f"{job_name}-{suffix}"
            meta = template.get("metadata", {})
            labels = {**meta.get("labels", {}), "batch.kubernetes.io/job-name": job_name, "job-name": job_name}
            annotations = dict(meta.get("annotations", {}))
            if index is not None:
                annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            self.pods[name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()),
                             "labels": labels, "annotations": annotations, "creationTimestamp": now(),
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                  "uid": job["metadata"]["uid"], "controller": True}]},
                "spec": template["spec"],
                "status": {"phase": "Pending", "conditions": []},
            }
            self.logs[name] = []
            self.cond.notify_all()
            return name

    def set_unschedulable(self, pod: str, message: str, *, event_message: str | None = None) -> None:
        with self.cond:
            self.pods[pod]["status"]["conditions"] = [{"type": "PodScheduled", "status": "False",
                                                       "reason": "Unschedulable", "message": message}]
            self.events.append({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{pod}.{secrets.token_hex(8)}", "namespace": self.namespace,
                             "creationTimestamp": now()},
                "involvedObject": {"kind": "Pod", "name": pod, "namespace": self.namespace},
                "reason": "FailedScheduling", "type": "Warning", "source": {"component": "default-scheduler"},
                "message": event_message or message, "lastTimestamp": now(),
            })

    def start(self, pod: str) -> None:
        with self.cond:
            p = self.pods[pod]
            running = {"name": "job", "ready": True, "restartCount": 0, "image": "img", "imageID": "",
                       "state": {"running": {"startedAt": now()}}}
            p["status"] = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
                           "containerStatuses": [running]}
            self.cond.notify_all()

    def log(self, pod: str, *lines: str) -> None:
        with self.cond:
            for line in lines:
                last = self.logs[pod][-1][0] if self.logs[pod] else 0
                self.logs[pod].append((max(time.time_ns(), last + 1), line))
            self.cond.notify_all()

    def drop_log_streams(self, pod: str) -> None:
        """End the open follow streams of a pod, as an idle timeout or an API server restart would."""
        with self.cond:
            self.drops[pod] = self.drops.get(pod, 0) + 1
            self.cond.notify_all()

    def finish(self, pod: str, exit_code: int) -> None:
        with self.cond:
            p = self.pods.get(pod)
            if p is None:
                return
            p["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            p["status"]["containerStatuses"][0]["state"] = {"terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "finishedAt": now()}}
            self.cond.notify_all()

    def complete(self, job: str) -> None:
        self._condition(job, "Complete", "", "")

    def fail(self, job: str, reason: str, message: str) -> None:
        self._condition(job, "Failed", reason, message)

    def _condition(self, job: str, kind: str, reason: str, message: str) -> None:
        with self.cond:
            if job in self.jobs:
                status = self.jobs[job]["status"]
                status.setdefault("conditions", []).append({"type": kind, "status": "True", "reason": reason,
                                                            "message": message, "lastTransitionTime": now()})
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.closing or predicate(), timeout=timeout) and not self.closing

    def verbs(self) -> set[tuple[str, str]]:
        """(verb, resource) pairs of every request served: what RBAC must allow."""
        return {(r.verb, r.resource) for r in self.requests}

    # -- API semantics (called by the handler, under the lock)
    def _finished(self, pod: str) -> bool:
        p = self.pods.get(pod)
        return p is None or "terminated" in p["status"].get("containerStatuses", [{}])[0].get("state", {})

    def _delete_job(self, name: str, policy: str | None) -> dict | None:
        job = self.jobs.get(name)
        if job is None:
            return None
        self.deletions.append((name, policy))
        uid = job["metadata"]["uid"]
        for pod in [p for p, o in self.pods.items() if o["metadata"]["labels"].get("job-name") == name]:
            del self.pods[pod]  # its log stream ends (see _finished)
        for svc in [s for s, o in self.services.items()
                    if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]:
            del self.services[svc]
        del self.jobs[name]
        self.cond.notify_all()
        return job


def _selector(text: str | None) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in (text or "").split(",") if p]
    return {k: v for k, v in pairs}


def _field(obj: dict, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- plumbing
    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n)) if n else None

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if method in ("POST", "DELETE") else None
        try:
            self._dispatch(method, url.path, query, body)
        except Exception:
            self.kube.errors.append(traceback.format_exc())
            self._status(500, "InternalError", "fake failed")

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_DELETE = lambda self: self._route("DELETE")  # noqa: E731

    def _record(self, verb: str, resource: str, name: str | None, query: dict, body: Any) -> None:
        with self.kube.cond:
            self.kube.requests.append(Request(verb, resource, name, query, body))
            self.kube.cond.notify_all()

    def _validate(self, body: dict, ns: str) -> str | None:
        try:
            kubernetes_validate.validate(body, self.kube.schema_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return f"{'.'.join(map(str, exc.path))}: {exc.message}"
        if body.get("metadata", {}).get("namespace", ns) != ns:
            return "the namespace of the object does not match the namespace of the request"
        return None

    # -- endpoints
    def _dispatch(self, method: str, path: str, query: dict, body: Any) -> None:
        k = self.kube
        if m := JOBS.match(path):
            ns, name = m.groups()
            verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if name else "list")
            self._record(verb, "jobs", name, query, body)
            if ns != k.namespace:
                return self._status(403, "Forbidden", f"namespace {ns} is not served")
            if method == "POST" and not name:
                return self._create_job(body, ns)
            if method == "GET" and name:
                with k.cond:
                    job = k.jobs.get(name)
                    return self._send(200, job) if job else self._status(404, "NotFound", f'jobs "{name}" not found')
            if method == "DELETE" and name:
                policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
                with k.cond:
                    job = k._delete_job(name, policy)
                if job is None:
                    return self._status(404, "NotFound", f'jobs "{name}" not found')
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                        "details": {"name": name, "group": "batch", "kind": "jobs",
                                                    "uid": job["metadata"]["uid"]}})
        elif m := CORE.match(path):
            ns, kind, name, log = m.groups()
            resource = f"{kind}/log" if log else kind
            verb = "create" if method == "POST" else ("get" if name else "list")
            self._record(verb, resource, name, query, body)
            if ns != k.namespace:
                return self._status(403, "Forbidden", f"namespace {ns} is not served")
            if kind == "pods" and not name and method == "GET":
                want = _selector(query.get("labelSelector"))
                with k.cond:
                    items = [p for p in k.pods.values()
                             if all(p["metadata"]["labels"].get(a) == b for a, b in want.items())]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            if kind == "pods" and log and method == "GET":
                return self._log(name, query)
            if kind == "events" and not name and method == "GET":
                want = _selector(query.get("fieldSelector"))
                with k.cond:
                    items = [e for e in k.events if all(_field(e, a) == b for a, b in want.items())]
                    return self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
            if kind == "services" and not name and method == "POST":
                if err := self._validate(body, ns):
                    return self._status(422, "Invalid", err)
                with k.cond:
                    svc_name = body["metadata"]["name"]
                    if svc_name in k.services:
                        return self._status(409, "AlreadyExists", f'services "{svc_name}" already exists')
                    body["metadata"]["uid"] = str(uuid.uuid4())
                    k.services[svc_name] = body
                    k.cond.notify_all()
                return self._send(201, body)
        else:
            self._record(method.lower(), path, None, query, body)
        self._status(404, "NotFound", f"the fake does not serve {method} {path}")

    def _create_job(self, body: dict, ns: str) -> None:
        k = self.kube
        if err := self._validate(body, ns):
            return self._status(422, "Invalid", err)
        name = body["metadata"]["name"]
        with k.cond:
            if name in k.jobs:
                return self._status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now(), namespace=ns)
            body["status"] = {}
            k.jobs[name] = body
            k.cond.notify_all()
        self._send(201, body)
        if k.on_job_created is not None:
            threading.Thread(target=self._scenario, args=(json.loads(json.dumps(body)),), daemon=True).start()

    def _scenario(self, job: dict) -> None:
        try:
            self.kube.on_job_created(self.kube, job)
        except Exception:  # fail the Job too, so that the launcher under test returns instead of hanging
            self.kube.errors.append(traceback.format_exc())
            self.kube.fail(job["metadata"]["name"], "ScenarioError", "the test scenario raised")

    def _log(self, pod: str, query: dict) -> None:
        k = self.kube
        with k.cond:
            p = k.pods.get(pod)
            if p is None:
                return self._status(404, "NotFound", f'pods "{pod}" not found')
            state = p["status"].get("containerStatuses", [{}])[0].get("state", {})
            if "running" not in state and "terminated" not in state:
                return self._status(400, "BadRequest", f'container "job" in pod "{pod}" is waiting to start: '
                                                       "ContainerCreating")
            drops = k.drops.get(pod, 0)
        since_ns = time.time_ns() - int(query["sinceSeconds"]) * 10**9 if "sinceSeconds" in query else 0
        stamps = query.get("timestamps") == "true"

        def fmt(entries: list[tuple[int, str]]) -> bytes:
            return "".join(f"{rfc3339nano(ns)} {line}\n" if stamps else f"{line}\n"
                           for ns, line in entries if ns >= since_ns).encode()

        if query.get("follow") != "true":
            with k.cond:
                entries = list(k.logs[pod])
            if "tailLines" in query:
                entries = entries[-int(query["tailLines"]):]
            data = fmt(entries)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        while True:
            with k.cond:
                k.cond.wait_for(lambda n=sent: k.closing or len(k.logs.get(pod, ())) > n or k._finished(pod)
                                or k.drops.get(pod, 0) != drops, timeout=1)
                cut = k.drops.get(pod, 0) != drops
                new = [] if cut else k.logs.get(pod, [])[sent:]
                sent += len(new)
                done = cut or k.closing or k._finished(pod)
            if data := fmt(new):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            if done:
                break
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def rfc3339nano(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC, as the kubelet writes log timestamps (trailing zeros trimmed)."""
    base = datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{ns % 10**9:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"
