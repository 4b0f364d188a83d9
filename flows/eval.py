"""Evaluation flows: compare models in one table (`eval_flow`), and the recurring evaluation of the
registry's champion (`eval_champion_flow`, deployed on a nightly cron by `prefect.yaml`)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from components.eval.config import EvalConfig, ModelRef, SamplingConfig, SuiteConfig
from components.eval.history import append_history, history_figure, history_uri
from components.eval.report import markdown_report, table_rows
from flows.common import (
    config_flow,
    convenience,
    flow_log,
    parent_run,
    preset_choice,
    preset_config,
    preset_default,
    run_stage,
    stage_flow,
)
from flows.registry import STAGES
from infra.contract import StageResult
from infra.settings import get_settings
from infra.tracking import metric_key

log = logging.getLogger(__name__)


EvalPreset = preset_choice("eval")
# the default preset's models, named in its report (base, rl, student): the form's `models` lists their URIs
PRESET_MODELS: list[dict[str, Any]] = preset_default("eval", "models") or []


def _run(config: EvalConfig) -> dict[str, Any]:
    with stage_flow("eval", config) as (parent, _, summary):
        parent.log_text(summary["markdown"], "report.md")
        publish_artifacts(summary, key="eval-report")
    return summary


_config_flow = config_flow("eval", _run)


@flow(name="eval", description=STAGES["eval"].help)
def eval_flow(
    preset: EvalPreset = "tiny",
    models: list[str] | None = [m["uri"] for m in PRESET_MODELS] or None,  # noqa: B006 - never mutated
    dataset: str | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Compare models from a shipped preset's `eval` section.

    Args:
        preset: shipped preset (configs/NAME.yaml) whose `eval` section is the starting config.
        models: model URIs to compare, in report order (checkpoints, stage outputs, releases,
            models:/NAME@ALIAS, or latest:STAGE for the newest model of a stage in this store: latest:pretrain,
            latest:rl, latest:distill; empty: the preset's).
        dataset: prepared dataset of the suite, `suite.dataset` (empty: the preset's; none: the first
            model's lineage).
        seed: seed of the samples, `sampling.seed` (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `sampling.n_samples=16`.
    """
    named = {m["uri"]: m for m in PRESET_MODELS}  # the default preset's references keep its row names
    fields = {"models": [dict(named.get(m, {"uri": m})) for m in models] if models else None, "suite.dataset": dataset,
              "sampling.seed": seed}
    return _run(preset_config("eval", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: the report URI, the job's MLflow run, one entry per model, the table."""
    report_uri = result.outputs["report"]
    report = result.extra["report"]  # the published report.json, as the stage returned it
    k_values = report["settings"]["k_values"]
    models = [{"name": r["name"], "uri": r["uri"], "ref": r.get("ref"), "metrics": r["metrics"],
               "val_loss": r["val_loss"],
               "efficiency": {k: v for k, v in r["efficiency"].items() if k != "lineage"}}
              for r in report["rows"]]
    return {"report_uri": report_uri, "mlflow_run_id": result.mlflow_run_id, "cached": result.cached,
            "suite": report["suite"], "models": models, "table": table_rows(report["rows"], k_values),
            "markdown": markdown_report(report)}


def publish_artifacts(summary: dict[str, Any], key: str) -> None:
    """The report as a Prefect markdown artifact and a table artifact (in the flow process)."""
    convenience("the Prefect artifact", create_markdown_artifact, key=key, markdown=summary["markdown"],
                description="model comparison")
    convenience("the Prefect artifact", create_table_artifact, key=f"{key}-table", table=summary["table"],
                description="model comparison")


def describe(summary: dict[str, Any]) -> str:
    head = (f"report: {summary['report_uri']}\nMLflow run: {summary['mlflow_run_id']}"
            f"{' (cached)' if summary.get('cached') else ''}")
    table = summary["markdown"].split("\n\n")[1] if "\n\n" in summary["markdown"] else summary["markdown"]
    return f"{head}\n{table}"


def run(config: dict[str, Any]) -> dict[str, Any]:
    """The full config (the CLI): the same body as the deployed flow, in a flow run named eval."""
    return _config_flow(EvalConfig.model_validate(config))


# ---- recurring evaluation of the champion ---------------------------------------------------------
@flow(name="eval-champion", description="Evaluate models:/<name>@<alias> and append to its history plot.")
def eval_champion_flow(
    model_name: str = "moeflow-teacher",
    alias: str = "champion",
    dataset: str | None = None,
    task_files: list[str] | None = None,
    max_per_family: int | None = 50,
    sampling: SamplingConfig | None = None,
) -> dict[str, Any]:
    """Evaluate the model version the alias points at now, append a row to
    `<store>/eval-history/<name>-<alias>.json`, and log the row and the history plot to MLflow.

    Args:
        model_name: registered model name in the MLflow Model Registry (the pipeline registers
            moeflow-teacher and moeflow-student).
        alias: the registry alias to evaluate (champion: the last release whose gate passed).
        dataset: the suite's prepared dataset: a URI or latest:prep (empty: the one in the model's lineage).
        task_files: user JSONL task files added to the suite.
        max_per_family: at most this many held-out problems per task family.
        sampling: sampling settings (empty: the eval stage's defaults).
    """
    from components.refs.models import registry_version, resolve_model_ref

    ref = f"models:/{model_name}@{alias}"
    version = registry_version(ref)
    model_uri = resolve_model_ref(ref)
    config = EvalConfig(
        models=[ModelRef(uri=ref, name=f"{model_name}@{alias}")],
        suite=SuiteConfig(dataset=dataset, task_files=task_files or [], max_per_family=max_per_family),
        sampling=sampling or SamplingConfig(),
    )
    from flows.references import resolve_references

    data = resolve_references("eval", config.model_dump(mode="json"), log=flow_log,  # dataset: latest:prep
                              hint=lambda path: "set the field `dataset` to a URI")
    with parent_run("eval-champion", params={"model": ref, "version": version, **data}) as parent:
        result = run_stage("eval", data, parent.run_id)
        summary = summarize(result)
        row = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": ref, "version": version, "model_uri": model_uri,
            "metrics": summary["models"][0]["metrics"], "val_loss": summary["models"][0]["val_loss"],
            "report_uri": summary["report_uri"], "eval_mlflow_run_id": result.mlflow_run_id,
            "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
        }
        hist_uri = history_uri(get_settings().store_uri, model_name, alias)
        history = append_history(hist_uri, row)
        parent.log_metrics({metric_key(k): v for k, v in row["metrics"].items()}, step=len(history) - 1)
        parent.set_tags({"moeflow.model_ref": ref, "moeflow.model_version": version,
                         "moeflow.history_uri": hist_uri})
        parent.log_dict(history, "history.json")
        parent.log_figure(history_figure(history, f"{ref} over time"), "plots/history.png")
        publish_artifacts(summary, key="eval-champion")
    return {"history_uri": hist_uri, "evaluations": len(history), "row": row, "parent_run_id": parent.run_id,
            **{k: summary[k] for k in ("report_uri", "mlflow_run_id", "cached")}}
