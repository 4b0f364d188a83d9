"""The pretraining flow: one typed config in (a form in the Prefect UI), a pretrained model out.

The job runs with the config's `resources` (torchrun when several processes per node). A retried task
lands on the same content-addressed output and the job resumes from its newest checkpoint there.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.training.config import PretrainConfig
from flows.common import stage_flow
from flows.registry import STAGES
from infra.contract import StageResult


@flow(name="pretrain", description=STAGES["pretrain"].help)
def pretrain_flow(config: PretrainConfig) -> dict[str, Any]:
    with stage_flow("pretrain", config, resources=config.resources) as (parent, _, summary):
        parent.set_tags({"moeflow.checkpoint_uri": summary["checkpoint_uri"]})
    return summary


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
    return pretrain_flow(PretrainConfig.model_validate(config))
