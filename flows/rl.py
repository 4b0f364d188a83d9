"""The RL flow: one typed config in (a form in the Prefect UI), a GRPO-trained policy out.

The job runs without a Prefect context, so it leaves its sample completions in `<report>/samples.json`;
this flow publishes them as a Prefect table artifact (and the reward summary as a markdown artifact).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components.rl.config import RLConfig
from components.rl.report import table_for_prefect
from flows.common import config_flow, convenience, preset_choice, preset_config, preset_default, stage_flow
from flows.registry import STAGES
from infra import storage
from infra.contract import StageResult

log = logging.getLogger(__name__)


RLPreset = preset_choice("rl")


def _run(config: RLConfig) -> dict[str, Any]:
    with stage_flow("rl", config) as (parent, result, summary):
        parent.set_tags({"moeflow.checkpoint_uri": summary["checkpoint_uri"]})
        convenience("the Prefect artifacts", publish_artifacts, summary,
                    storage.join_uri(result.outputs["report"], "samples.json"))
    return summary


_config_flow = config_flow("rl", _run)


@flow(name="rl", description=STAGES["rl"].help)
def rl_flow(
    preset: RLPreset = "tiny",
    model: str | None = preset_default("rl", "model"),
    dataset: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train a policy with GRPO from a shipped preset's `rl` section.

    Args:
        preset: shipped preset (configs/NAME.yaml) whose `rl` section is the starting config.
        model: the model to start from: a checkpoint URI, a stage output, a release, models:/NAME@ALIAS,
            or latest:pretrain for the newest pretrained model in this store (empty: the preset's).
        dataset: prepared dataset URI (empty: the preset's; none: the dataset in the model's lineage).
        steps: GRPO steps, `grpo.steps` (empty: the preset's).
        lr: learning rate, `grpo.optim.lr` (empty: the preset's).
        seed: seed of the rollouts and the prompt order (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `rewards.steps_weight=0`.
    """
    fields = {"model": model, "dataset": dataset, "grpo.steps": steps, "grpo.optim.lr": lr,
              "seed": seed}
    return _run(preset_config("rl", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON; it ends with checkpoint_uri, mlflow_run_id and the reward/accuracy start and end."""
    m = result.metrics
    report = result.extra["summary"]  # the report's summary.json, as the stage returned it
    out: dict[str, Any] = {
        "report_uri": result.outputs["report"],
        "cached": result.cached,
        "recipe": report["recipe"],
        "eval": {"family": report["eval_family"], "problems": report["eval_problems"],
                 "samples": report["eval_samples"], "evaluations": report["evals"]},
        "metrics": m,
    }
    for name in ("cold_start", "traces"):
        if name in result.outputs:
            out[f"{name}_uri"] = result.outputs[name]
    out.update({
        "checkpoint_uri": result.outputs["checkpoint"], "mlflow_run_id": result.mlflow_run_id,
        "reward_start": m["reward_start"], "reward_end": m["reward_end"],
        "accuracy_start": m["accuracy_start"], "accuracy_end": m["accuracy_end"],
    })
    return out


def publish_artifacts(summary: dict[str, Any], samples_uri: str) -> None:
    """Sample completions as a Prefect table artifact, the headline numbers as a markdown artifact."""
    rows = storage.read_json(samples_uri)
    create_table_artifact(key="rl-samples", table=table_for_prefect(rows),
                          description="sample completions per interval (step, question, completion, reward)")
    create_markdown_artifact(key="rl-summary", markdown=_markdown(summary), description="GRPO run summary")


def _markdown(s: dict[str, Any]) -> str:
    e = s["eval"]
    return (f"## RL ({s['recipe']})\n\n| | start | end |\n|---|---|---|\n"
            f"| reward (total) | {s['reward_start']:.3f} | {s['reward_end']:.3f} |\n"
            f"| held-out {e['family']} pass@1 ({e['problems']} problems x {e['samples']}) | "
            f"{s['accuracy_start']:.3f} | {s['accuracy_end']:.3f} |\n\n"
            f"policy: `{s['checkpoint_uri']}`  \nMLflow run: `{s['mlflow_run_id']}`\n")


def describe(summary: dict[str, Any]) -> str:
    e = summary["eval"]
    lines = [f"policy: {summary['checkpoint_uri']}",
             f"MLflow run: {summary['mlflow_run_id']}{' (cached)' if summary.get('cached') else ''}",
             f"reward: {summary['reward_start']:.3f} -> {summary['reward_end']:.3f}",
             f"held-out {e['family']} pass@1: {summary['accuracy_start']:.3f} -> {summary['accuracy_end']:.3f} "
             f"({e['problems']} problems x {e['samples']} samples)"]
    if "traces_uri" in summary:
        lines.append(f"traces: {summary['traces_uri']}")
    return "\n".join(lines)


def run(config: dict[str, Any]) -> dict[str, Any]:
    """The full config (the CLI): the same body as the deployed flow, in a flow run named rl."""
    return _config_flow(RLConfig.model_validate(config))
