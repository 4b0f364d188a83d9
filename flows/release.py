"""The release flow: a trained model (and its evaluation) in; a published MIT release out, registered in
the MLflow Model Registry as `candidate`, and promoted to `champion` when the evaluation gate passes."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from components.release.config import ReleaseConfig
from flows.common import config_flow, convenience, preset_choice, preset_config, preset_default, stage_flow
from flows.registry import STAGES
from infra import storage
from infra.contract import StageResult

log = logging.getLogger(__name__)


ReleasePreset = preset_choice("release")


def _run(config: ReleaseConfig) -> dict[str, Any]:
    with stage_flow("release", config) as (parent, _, summary):
        parent.set_tags({"moeflow.release_uri": summary["release_uri"],
                         "moeflow.release_sha256": summary["release_sha256"]})
        convenience("the Prefect artifact", lambda: create_markdown_artifact(
            key="release-card", markdown=storage.read_text(storage.join_uri(summary["release_uri"], "README.md")),
            description="model card of the release"))
    return summary


_config_flow = config_flow("release", _run)


@flow(name="release", description=STAGES["release"].help)
def release_flow(
    preset: ReleasePreset = "tiny",
    model: str | None = preset_default("release", "model"),
    eval_report: str | None = preset_default("release", "eval_report"),
    name: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Package, publish and register a release from a shipped preset's `release` section.

    Args:
        preset: shipped preset (configs/NAME.yaml) whose `release` section is the starting config.
        model: model to release: a checkpoint URI, a stage output, a release, models:/NAME@ALIAS, or
            latest:rl / latest:distill for the newest RL policy / student in this store (empty: the preset's).
        eval_report: its evaluation: an eval stage output or report, or latest:eval for the newest
            evaluation in this store that evaluated `model` (empty: the preset's).
        name: registered model name in the MLflow Model Registry (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `gate.promote=false`.
    """
    fields = {"model": model, "eval_report": eval_report, "name": name}
    return _run(preset_config("release", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: release URI and digest, registry version, gate decision, evaluation metrics — as the
    stage returned them (`result.extra`), nothing re-read or recomputed."""
    release_uri = result.outputs["release"]
    x, m = result.extra, result.metrics
    gate = x["gate"]
    return {
        "release_uri": release_uri,
        "release_sha256": x["release_sha256"],
        "mlflow_run_id": result.mlflow_run_id,
        "cached": result.cached,
        "registered_model": x["name"],
        "version": x["version"],
        "gate": {
            "passed": bool(gate["passed"]),
            "promoted": bool(gate["promoted"]),
            "reasons": gate.get("reasons", []),
            "champion_version": x["champion_version"],
        },
        "evaluation": x["evaluation"],
        "total_params": int(m.get("total_params", 0)),
        "active_params": int(m.get("active_params", 0)),
        "files": int(m["release_files"]),
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
    """The full config (the CLI): the same body as the deployed flow, in a flow run named release."""
    return _config_flow(ReleaseConfig.model_validate(config))
