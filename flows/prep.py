"""The data-prep flow: one typed config in (a form in the Prefect UI), a published dataset out."""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.data.config import PrepConfig
from flows.common import config_flow, preset_choice, preset_config, stage_flow
from flows.registry import STAGES
from infra.contract import StageResult

PrepPreset = preset_choice("prep")


def _run(config: PrepConfig) -> dict[str, Any]:
    with stage_flow("prep", config) as (parent, _, summary):
        parent.set_tags({"moeflow.dataset_uri": summary["dataset_uri"]})
    return summary


_config_flow = config_flow("prep", _run)


@flow(name="prep", description=STAGES["prep"].help)
def prep_flow(
    preset: PrepPreset = "tiny",
    seed: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Prepare a dataset from a shipped preset's `prep` section.

    Args:
        preset: shipped preset (configs/NAME.yaml) whose `prep` section is the starting config.
        seed: seed of the generators and the split (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `tokenizer.vocab_size=1024`.
    """
    fields = {"seed": seed}
    return _run(preset_config("prep", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: dataset URI, the job's MLflow run, and the dataset statistics."""
    dataset_uri = result.outputs["dataset"]
    stats = result.extra["stats"]
    return {"dataset_uri": dataset_uri, "mlflow_run_id": result.mlflow_run_id, "cached": result.cached,
            "stats": stats}


def describe(summary: dict[str, Any]) -> str:
    s = summary["stats"]
    tok = s.get("tokens", {})
    splits = ", ".join(f"{name} {v.get('tokens', 0):,}" for name, v in tok.items())
    docs = s.get("documents", {})
    return (f"dataset: {summary['dataset_uri']}{' (cached)' if summary.get('cached') else ''}\n"
            f"MLflow run: {summary['mlflow_run_id']}\n"
            f"documents: {docs.get('in', 0):,} in, {docs.get('out', 0):,} kept; tokens: {splits}; "
            f"vocabulary: {s.get('tokenizer', {}).get('vocab_size')}")


def run(config: dict[str, Any]) -> dict[str, Any]:
    """The full config (the CLI): the same body as the deployed flow, in a flow run named prep."""
    return _config_flow(PrepConfig.model_validate(config))
