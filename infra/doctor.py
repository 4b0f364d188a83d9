"""`moeflow doctor`: does every configured service answer? Each check returns ok + a short detail, within
`settings.service_timeout_s` (a check that does not answer in time fails naming its endpoint)."""

from __future__ import annotations

import base64
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from infra import storage
from infra.redact import mask_uri, redact
from infra.settings import Settings
from infra.timeouts import call_with_timeout


def _check(name: str, fn: Callable[[], str], timeout_s: float, endpoint: str | None) -> dict[str, Any]:
    """Run one check, bounded by `timeout_s`; its detail never shows a URI password."""
    t0 = time.time()
    try:
        detail = call_with_timeout(fn, timeout_s, f"{name} check of {endpoint or 'the service'}")
        ok = True
    except Exception as exc:  # a doctor reports, it does not crash
        detail, ok = f"{type(exc).__name__}: {exc}", False
        if endpoint and endpoint not in detail:
            detail = f"{endpoint}: {detail}"
    return {"name": name, "ok": ok, "detail": redact(str(detail)), "seconds": round(time.time() - t0, 3)}


def check_store(settings: Settings) -> str:
    probe = storage.join_uri(settings.store_uri, ".doctor", f"{uuid.uuid4().hex}.txt")
    storage.write_text(probe, "ok")
    try:
        if storage.read_text(probe) != "ok":
            raise RuntimeError(f"read back something else from {probe}")
    finally:
        storage.delete_prefix(probe)
    return f"{mask_uri(settings.store_uri)} is writable and readable"


def check_tracking(settings: Settings) -> str:
    from infra.tracking import experiment_id

    exp = experiment_id(settings)
    return f"{mask_uri(settings.tracking_uri)} answers (experiment {settings.experiment!r} = {exp})"


def check_prefect(settings: Settings) -> str:
    if not settings.prefect_api_url:
        return "ephemeral API (started in-process on demand)"
    parts = urlsplit(settings.prefect_api_url.rstrip("/") + "/health")
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # urllib cannot parse user:pw@
    request = urllib.request.Request(bare)  # noqa: S310 - the user's configured URL
    if parts.username is not None:  # credentials in the URL: HTTP basic auth, as Prefect's auth string
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=settings.service_timeout_s) as resp:  # noqa: S310 - the user's configured URL
        return f"{mask_uri(settings.prefect_api_url)} answers (HTTP {resp.status})"


def check_kubernetes(settings: Settings) -> str:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    client.BatchV1Api().list_namespaced_job(settings.kubernetes.namespace, limit=1)
    return f"API answers; namespace {settings.kubernetes.namespace!r} is listable"


def run_checks(settings: Settings) -> list[dict[str, Any]]:
    t = settings.service_timeout_s
    s3 = settings.s3.endpoint_url if storage.is_remote(settings.store_uri) else None
    checks = [
        _check("store", lambda: check_store(settings), t, mask_uri(s3 or settings.store_uri)),
        _check("tracking", lambda: check_tracking(settings), t, mask_uri(settings.tracking_uri)),
        _check("prefect", lambda: check_prefect(settings), t, mask_uri(settings.prefect_api_url or "ephemeral")),
    ]
    if settings.launcher == "kubernetes":
        checks.append(_check("kubernetes", lambda: check_kubernetes(settings), t, "the Kubernetes API"))
    return checks


def preflight(settings: Settings) -> None:
    """Before a stage starts: the configured tracking server and Prefect API answer within
    `service_timeout_s`, else ServiceTimeout / the client's error, naming the endpoint (password masked)."""
    t = settings.service_timeout_s
    if settings.tracking_uri.startswith(("http://", "https://")):
        call_with_timeout(lambda: check_tracking(settings), t,
                          f"MLflow tracking server {mask_uri(settings.tracking_uri)}")
    if settings.prefect_api_url:
        call_with_timeout(lambda: check_prefect(settings), t, f"Prefect API {mask_uri(settings.prefect_api_url)}")
