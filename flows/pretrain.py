"""The pretraining flow: one typed config in (a form in the Prefect UI), a pretrained model out.

The job runs with the config's `resources` (torchrun when several processes per node). A retried task
lands on the same content-addressed output and the job resumes from its newest checkpoint there.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.training.config import PretrainConfig
from flows.common import config_flow, preset_choice, preset_config, preset_default, stage_flow
from flows.registry import STAGES
from infra.contract import StageResult

PretrainPreset = preset_choice("pretrain")


def _run(config: PretrainConfig) -> dict[str, Any]:
    with stage_flow("pretrain", config, resources=config.resources) as (parent, _, summary):
        parent.set_tags({"moeflow.checkpoint_uri": summary["checkpoint_uri"]})
    return summary


_config_flow = config_flow("pretrain", _run)


@flow(name="pretrain", description=STAGES["pretrain"].help)
def pretrain_flow(
    preset: PretrainPreset = "tiny",
    dataset: str | None = preset_default("pretrain", "dataset"),
    steps: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Pretrain a model from a shipped preset's `pretrain` section.

    Args:
        preset: shipped preset whose `pretrain` section is the starting config (configs/NAME.yaml, or a
            pretraining config of configs/pretrain/: small, h200, multinode).
        dataset: the prepared dataset: a URI (`dataset_uri` of a prep run), or latest:prep for the newest
            prep output in this store (empty: the preset's).
        steps: optimizer steps (empty: the preset's).
        lr: peak learning rate, `optim.lr` (empty: the preset's).
        seed: seed of the initialisation and the data order (empty: the preset's).
        overrides: `key=value` strings applied last, in order (dotted keys, YAML values), e.g.
            `schedule.warmup_steps=20`.
    """
    fields = {"dataset": dataset, "steps": steps, "optim.lr": lr, "seed": seed}
    return _run(preset_config("pretrain", preset, fields, overrides))  # type: ignore[arg-type]


def summarize(result: StageResult) -> dict[str, Any]:
    """The CLI's JSON: the model URI, the job's MLflow run, and the headline metrics (last: the keys
    scripts read — checkpoint_uri, mlflow_run_id, final_loss, tokens_per_s, mfu)."""
    m = result.metrics
    extra = {k: v for k, v in m.items() if k not in ("final_loss", "tokens_per_s", "mfu")}
    return {
        "cached": result.cached,
        "metrics": extra,
        "checkpoint_uri": result.outputs["checkpoint"],
        "mlflow_run_id": result.mlflow_run_id,
        "final_loss": m.get("final_loss"),
        "tokens_per_s": m.get("tokens_per_s"),
        "mfu": m.get("mfu"),
    }


def describe(summary: dict[str, Any]) -> str:
    m = summary.get("metrics", {})
    lines = [
        f"model: {summary['checkpoint_uri']}",
        f"MLflow run: {summary['mlflow_run_id']}{' (cached)' if summary.get('cached') else ''}",
        f"final loss: {summary['final_loss']:.4f}" + (f"  validation loss: {m['val_loss']:.4f}"
                                                       if "val_loss" in m else ""),
        f"throughput: {summary['tokens_per_s']:,.0f} tokens/s  MFU: {100 * summary['mfu']:.2f}%",
    ]
    if "tokens" in m:
        lines.append(f"tokens: {m['tokens']:,.0f}  device-hours: {m.get('device_hours', 0):.4g}  "
                     f"cost: ${m.get('cost_usd', 0):.4g}")
    if "max_mean_load" in m:
        lines.append(f"expert load max/mean after warm-up: {m['max_mean_load']:.3f}")
    return "\n".join(lines)


def run(config: dict[str, Any]) -> dict[str, Any]:
    """The full config (the CLI): the same body as the deployed flow, in a flow run named pretrain."""
    return _config_flow(PretrainConfig.model_validate(config))
