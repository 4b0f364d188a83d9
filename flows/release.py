"""The release flow: a trained model (and its evaluation) in; a published MIT release out, registered in
the MLflow Model Registry as `candidate`, and promoted to `champion` when the evaluation gate passes."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from components.release.config import ReleaseConfig
from components.release.stage import GATE_NAME
from flows.common import parent_run, run_stage
from infra import storage
from infra.jobs import StageResult

log = logging.getLogger(__name__)


@flow(name="release", description="Package, publish, register and (if the gate passes) promote a release.")
def release_flow(config: ReleaseConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    with parent_run("release", params=data) as parent:
        result = run_stage("release", data, parent.run_id)
        summary = summarize(result)
        parent.log_metrics(result.metrics)
        parent.set_tags({"moeflow.release_uri": summary["release_uri"],
                         "moeflow.release_sha256": summary["release_sha256"]})
        try:
            card = storage.read_text(storage.join_uri(summary["release_uri"], "README.md"))
            create_markdown_artifact(key="release-card", markdown=card, description="model card of the release")
        except Exception as exc:  # an artifact is a convenience; never fail a release for it
            log.warning("could not create the Prefect artifact: %s", exc)
    summary["parent_run_id"] = parent.run_id
    return summary


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: release URI and digest, registry version, gate decision, evaluation metrics."""
    release_uri = result.outputs["release"]
    manifest = storage.read_manifest(release_uri)
    if manifest is None:
        raise storage.NotPublishedError(f"{release_uri} is no longer published")
    meta = manifest.meta
    gate_uri = storage.join_uri(release_uri.rstrip("/").rsplit("/", 1)[0], GATE_NAME)
    gate = storage.read_json(gate_uri) if storage.exists(gate_uri) else (meta.get("gate") or {})
    m = result.metrics
    version = m.get("model_version")
    champion = m.get("champion_version")
    return {
        "release_uri": release_uri,
        "release_sha256": manifest.digest(),
        "mlflow_run_id": result.mlflow_run_id,
        "cached": result.cached,
        "registered_model": meta.get("name"),
        "version": None if version is None else int(version),
        "gate": {
            "passed": bool(m.get("gate_passed")),
            "promoted": bool(m.get("promoted")),
            "reasons": gate.get("reasons", []),
            "champion_version": None if champion is None else int(champion),
        },
        "evaluation": (meta.get("evaluation") or {}).get("metrics", {}),
        "total_params": int(m.get("total_params", 0)),
        "active_params": int(m.get("active_params", 0)),
        "files": int(m.get("release_files", len(manifest.files))),
        "bytes": int(m.get("release_bytes", 0)),
    }


def describe(summary: dict[str, Any]) -> str:
    g = summary["gate"]
    lines = [
        f"release: {summary['release_uri']}{' (cached)' if summary.get('cached') else ''}",
        f"manifest digest: {summary['release_sha256']}",
        f"MLflow run: {summary['mlflow_run_id']}",
        f"parameters: {summary['total_params']:,} total, {summary['active_params']:,} active; "
        f"{summary['files']} files, {summary['bytes']:,} bytes",
    ]
    if summary.get("version") is not None:
        lines.append(f"registered: {summary['registered_model']} version {summary['version']} (alias candidate)")
    if g["promoted"]:
        lines.append("gate passed: promoted to champion")
    elif g["passed"] and g["reasons"]:  # the champion changed while the release was built
        lines.append("gate passed, but not promoted against the champion of that moment: " + "; ".join(g["reasons"]))
    elif g["passed"]:
        lines.append("gate passed; not promoted (gate.promote is false, or the release is not registered)")
    else:
        champ = f" (champion: version {g['champion_version']})" if g.get("champion_version") is not None else ""
        lines.append(f"gate failed{champ}, champion unchanged: " + "; ".join(g["reasons"]))
    return "\n".join(lines)


def run(config: dict[str, Any]) -> dict[str, Any]:
    return release_flow(ReleaseConfig.model_validate(config))
