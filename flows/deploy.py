"""Prefect deployments from `prefect.yaml`: registered on a Kubernetes work pool (`moeflow deploy`), or
served from this process (`moeflow serve`, `moeflow up`) so that the local UI can trigger every flow and
the evaluation schedule runs on a laptop.

`prefect.yaml` stays the single declaration of deployments, schedules and job variables; this module
reads it and turns each entry into a Prefect `RunnerDeployment` built from the imported flow, so the
parameter schema Prefect shows as a form is the flow's own typed signature.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

import infra
from flows.registry import load_flow

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
BASE_JOB_TEMPLATE = Path(infra.__file__).resolve().parent / "k8s" / "base-job-template.json"

log = logging.getLogger(__name__)


def load_entries(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` of prefect.yaml (YAML anchors resolved)."""
    data = yaml.safe_load(path.read_text())
    entries = data.get("deployments") or []
    names = [e.get("name") for e in entries]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{path}: every deployment needs a unique name, got {names}")
    return entries


def _schedules(entry: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron

    out = []
    for s in entry.get("schedules") or []:
        if "cron" not in s:
            raise ValueError(f"deployment {entry['name']}: only cron schedules are supported, got {s}")
        out.append(Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True)))
    return out


def runner_deployments(entries: list[dict[str, Any]], *, work_pool: bool) -> list[Any]:
    """RunnerDeployments for `serve` (work_pool=False) or for a work pool (work_pool=True). On a work pool
    the entry point is the flow's module path, importable from the installed package in the job image
    wherever its working directory is."""
    from prefect.deployments.runner import EntrypointType

    deployments = []
    for e in entries:
        kwargs: dict[str, Any] = {
            "name": e["name"],
            "description": e.get("description"),
            "tags": e.get("tags") or [],
            "parameters": e.get("parameters") or {},
            "schedules": _schedules(e),
        }
        if work_pool:
            pool = e.get("work_pool") or {}
            kwargs.update(work_pool_name=pool.get("name"), work_queue_name=pool.get("work_queue_name"),
                          job_variables=pool.get("job_variables") or {},
                          entrypoint_type=EntrypointType.MODULE_PATH)
        deployments.append(load_flow(e["entrypoint"]).to_deployment(**kwargs))
    return deployments


def ensure_work_pool(name: str, template_path: Path = BASE_JOB_TEMPLATE) -> str:
    """Create the Kubernetes work pool with moeflow's base job template when it is missing. An existing
    pool is left as it is: the Helm chart sets its namespace, service account and secrets per release."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    template = json.loads(template_path.read_text())
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template))
            return "created"
        except ObjectAlreadyExists:
            return "exists (left unchanged)"


def deploy_all(image: str, *, path: Path = PREFECT_YAML) -> list[str]:
    """Register every deployment of prefect.yaml on its work pool (created if missing); returns ids."""
    entries = load_entries(path)
    ids = []
    for entry, deployment in zip(entries, runner_deployments(entries, work_pool=True), strict=True):
        pool = (entry.get("work_pool") or {}).get("name")
        if not pool:
            raise ValueError(f"{path}: deployment {entry['name']} names no work_pool")
        log.info("work pool %s: %s", pool, ensure_work_pool(pool))
        ids.append(str(deployment.apply(image=image, work_pool_name=pool)))
    return ids


def serve_all(*, path: Path = PREFECT_YAML, limit: int | None = None) -> None:
    """Serve every deployment from this process (blocks; Ctrl-C stops)."""
    from prefect import serve

    serve(*runner_deployments(load_entries(path), work_pool=False), limit=limit,
          print_starting_message=False)
