"""`moeflow doctor`: does every configured service answer? Each check returns ok + a short detail."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from infra import storage
from infra.settings import Settings


def _check(name: str, fn: Callable[[], str]) -> dict[str, Any]:
    t0 = time.time()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # a doctor reports, it does not crash
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return {"name": name, "ok": ok, "detail": detail, "seconds": round(time.time() - t0, 3)}


def check_store(settings: Settings) -> str:
    probe = storage.join_uri(settings.store_uri, ".doctor", f"{uuid.uuid4().hex}.txt")
    storage.write_text(probe, "ok")
    try:
        if storage.read_text(probe) != "ok":
            raise RuntimeError(f"read back something else from {probe}")
    finally:
        storage.delete_prefix(probe)
    return f"{settings.store_uri} is writable and readable"


def check_tracking(settings: Settings) -> str:
    from infra.tracking import experiment_id

    exp = experiment_id(settings)
    return f"{settings.tracking_uri} answers (experiment {settings.experiment!r} = {exp})"


def check_prefect(settings: Settings) -> str:
    if not settings.prefect_api_url:
        return "ephemeral API (started in-process on demand)"
    url = settings.prefect_api_url.rstrip("/") + "/health"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the user's configured URL
        return f"{settings.prefect_api_url} answers (HTTP {resp.status})"


def check_kubernetes(settings: Settings) -> str:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    client.BatchV1Api().list_namespaced_job(settings.kubernetes.namespace, limit=1)
    return f"API answers; namespace {settings.kubernetes.namespace!r} is listable"


def run_checks(settings: Settings) -> list[dict[str, Any]]:
    checks = [
        _check("store", lambda: check_store(settings)),
        _check("tracking", lambda: check_tracking(settings)),
        _check("prefect", lambda: check_prefect(settings)),
    ]
    if settings.launcher == "kubernetes":
        checks.append(_check("kubernetes", lambda: check_kubernetes(settings)))
    return checks
