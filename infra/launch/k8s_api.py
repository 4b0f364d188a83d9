"""The handful of Kubernetes API calls the launcher makes, and how to read the errors they raise.

Exactly the calls granted to the flow-runner Role of the Helm chart (helm/moeflow/templates/rbac.yaml).
"""

from __future__ import annotations

import json
from typing import Any


class KubeApi:
    """The handful of API calls the launcher makes, on plain dicts (`_preload_content=False`)."""

    def __init__(self, api_client: Any, namespace: str, container: str):
        from kubernetes import client

        self.ns = namespace
        self.container = container  # the one container whose logs `log_stream` reads
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
        return self.core.read_namespaced_pod_log(pod, self.ns, container=self.container, follow=follow,
                                                 tail_lines=tail_lines, since_seconds=since_seconds,
                                                 timestamps=timestamps, _preload_content=False)


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def is_transient(exc: BaseException) -> bool:
    """API errors worth retrying: server-side errors, throttling, lost connections."""
    import urllib3

    status = _status(exc)
    return (status is not None and (status >= 500 or status == 429)) or isinstance(exc, urllib3.exceptions.HTTPError)


def api_message(exc: Any) -> str:
    """The API server's own words for an error (the `message` of its JSON body), else the error's text."""
    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except Exception:
        return str(getattr(exc, "body", "") or exc)
