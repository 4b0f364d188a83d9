"""The distillation flow: a teacher in (an RL checkpoint or any release), verified traces and a student out."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from components.distill.config import DistillConfig
from flows.common import config_flow, convenience, preset_choice, preset_config, preset_default, stage_flow
from flows.registry import STAGES
from infra.contract import StageResult

HEADLINE = ("traces_kept", "traces_problems_solved", "traces_accept_rate", "traces_train", "traces_val",
            "sft_steps", "sft_loss", "val_completion_loss", "teacher_val_completion_loss", "student_active_params",
            "teacher_active_params", "active_ratio", "device_hours", "cost_usd")


DistillPreset = preset_choice("distill")


def _run(config: DistillConfig) -> dict[str, Any]:
    with stage_flow("distill", config) as (parent, _, summary):
        parent.set_tags({"moeflow.student_uri": summary["student_uri"], "moeflow.traces_uri": summary["traces_uri"]})
        convenience("the Prefect artifact", create_markdown_artifact, key="distill-summary",
                    markdown=markdown(summary), description="distillation: traces and student")
    return summary


_config_flow = config_flow("distill", _run)


@flow(name="distill", description=STAGES["distill"].help)
def distill_flow(
    preset: DistillPreset = "tiny",
    teacher: str | None = preset_default("distill", "teacher"),
    dataset: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Distil a teacher into a student from a shipped preset's `distill` section.

    Args:
        preset: shipped preset (configs/NAME.yaml) whose `distill` section is the starting config.
        teacher: teacher model: a checkpoint URI, a stage output, a release, models:/NAME@ALIAS, or
            latest:rl for the newest RL policy in this store (empty: the preset's).
        dataset: prepared dataset URI (empty: the preset's; none: the dataset in the teacher's lineage).
        steps: student SFT steps, `sft.max_steps` (empty: the preset's).
        lr: student learning rate, `sft.optim.lr` (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `traces.n_samples=8`.
    """
    fields = {"teacher": teacher, "dataset": dataset, "sft.max_steps": steps, "sft.optim.lr": lr}
    return _run(preset_config("distill", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: student and traces URIs, the job's MLflow run, trace statistics and metrics."""
    traces_uri = result.outputs["traces"]
    return {"student_uri": result.outputs["student"], "traces_uri": traces_uri,
            "mlflow_run_id": result.mlflow_run_id, "cached": result.cached, "trace_stats": result.extra["trace_stats"],
            "metrics": {k: result.metrics[k] for k in HEADLINE if k in result.metrics}}


def markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in summary["metrics"].items())
    return (f"# Distillation\n\nstudent: `{summary['student_uri']}`\n\ntraces: `{summary['traces_uri']}`\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n")


def describe(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    line = ", ".join(f"{k} {v:.4g}" for k, v in m.items())
    return (f"student: {summary['student_uri']}\ntraces: {summary['traces_uri']}\nMLflow run: "
            f"{summary['mlflow_run_id']}{' (cached)' if summary.get('cached') else ''}\n{line}")


def run(config: dict[str, Any]) -> dict[str, Any]:
    """The full config (the CLI): the same body as the deployed flow, in a flow run named distill."""
    return _config_flow(DistillConfig.model_validate(config))
