"""Prefect deployments from `prefect.yaml`: registered on a Kubernetes work pool (`moeflow deploy`), or
served from this process (`moeflow serve`, `moeflow up`) so that the local UI can trigger every flow and
the evaluation schedule runs on a laptop.

`prefect.yaml` stays the single declaration of deployments, schedules and job variables. `moeflow deploy`
is Prefect's own `prefect deploy --all` on it (every key Prefect knows is honoured: pull steps, work pool,
job variables, schedules, parameters), after creating missing work pools with moeflow's base job
template. Serving reads the keys that matter to a served deployment and refuses any other key by name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import subprocess
import sys
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


# What a served deployment reads from an entry; `work_pool` only matters on a work pool (`moeflow deploy`).
SERVED_KEYS = {"name", "entrypoint", "description", "tags", "parameters", "schedules", "work_pool", "version"}


def _schedules(entry: dict[str, Any]) -> list[Any]:
    """Prefect schedules from an entry: `cron`, `interval` (seconds or a duration) or `rrule`, with
    timezone, anchor_date, active, parameters, slug, day_or; any other key is an error naming it."""
    from prefect.schedules import Schedule

    known = {f.name for f in dataclasses.fields(Schedule)}
    out = []
    for s in entry.get("schedules") or []:
        where = f"deployment {entry['name']}: schedule {s}"
        if not isinstance(s, dict) or not {"cron", "interval", "rrule"} & set(s):
            raise ValueError(f"{where}: needs one of cron, interval or rrule")
        unknown = sorted(set(s) - known)
        if unknown:
            raise ValueError(f"{where}: unsupported keys {unknown} (known: {sorted(known)})")
        kw = dict(s)
        if isinstance(kw.get("interval"), int | float):
            kw["interval"] = dt.timedelta(seconds=kw["interval"])
        if isinstance(kw.get("anchor_date"), str):
            kw["anchor_date"] = dt.datetime.fromisoformat(kw["anchor_date"])
        kw.setdefault("timezone", "UTC")
        try:
            out.append(Schedule(**kw))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out


def runner_deployments(entries: list[dict[str, Any]]) -> list[Any]:
    """RunnerDeployments served from this process (`serve`): the parameter schema is the flow's own
    signature. `work_pool` is ignored (no pool when serving); any key serving cannot honour is an error."""
    deployments = []
    for e in entries:
        unknown = sorted(set(e) - SERVED_KEYS)
        if unknown:
            raise ValueError(f"deployment {e.get('name')}: keys {unknown} are not supported when serving "
                             f"(supported: {sorted(SERVED_KEYS)}); `prefect deploy` reads every key")
        kwargs: dict[str, Any] = {
            "name": e["name"],
            "description": e.get("description"),
            "tags": e.get("tags") or [],
            "parameters": e.get("parameters") or {},
            "schedules": _schedules(e),
        }
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


def deploy_all(image: str | None = None, *, path: Path = PREFECT_YAML, timeout_s: float = 600) -> list[str]:
    """Register every deployment of prefect.yaml with Prefect's own `prefect deploy --all` (Kubernetes work
    pools created first when missing; `image` is the flow-run pods' image, prefect.yaml's
    `{{ $MOEFLOW_IMAGE }}`: `prefect deploy` ignores `--job-variable` with `--all`); returns their ids."""
    from prefect.client.orchestration import get_client

    entries = load_entries(path)
    for entry in entries:
        pool = (entry.get("work_pool") or {}).get("name")
        if not pool:
            raise ValueError(f"{path}: deployment {entry['name']} names no work_pool")
        log.info("work pool %s: %s", pool, ensure_work_pool(pool))
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(path)]
    env = {**os.environ, "PREFECT_CLI_WRAP_LINES": "false"}
    if image:
        env["MOEFLOW_IMAGE"] = image
    if not env.get("MOEFLOW_IMAGE"):
        raise ValueError("moeflow deploy needs the flow-run image: pass --image or set MOEFLOW_IMAGE")
    proc = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    names = {e["name"] for e in entries}
    with get_client(sync_client=True) as client:
        ids = {d.name: str(d.id) for d in client.read_deployments() if d.name in names}
    missing = sorted(names - set(ids))
    if missing:
        raise RuntimeError(f"prefect deploy --all did not register {missing}:\n{proc.stdout[-3000:]}")
    return [ids[e["name"]] for e in entries]


def serve_all(*, path: Path = PREFECT_YAML, limit: int | None = None) -> None:
    """Serve every deployment from this process (blocks; Ctrl-C stops)."""
    from prefect import serve

    serve(*runner_deployments(load_entries(path)), limit=limit,
          print_starting_message=False)
