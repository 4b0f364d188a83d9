"""The `pretrain` stage: a prepared dataset in, a pretrained MoE model out (`<output>/model/`).

Runs inside `moeflow-job pretrain` (under torchrun when `resources.procs_per_node > 1`). Checkpoints go
to `<output>/checkpoints/`; since the output location is content-addressed, a retried or restarted job
finds its own checkpoints there and resumes. Outputs: `{"checkpoint": <model URI>}`; metrics include
`final_loss`, `val_loss`, `tokens_per_s`, `mfu`, `max_mean_load` and the efficiency ledger's numbers.
"""

from __future__ import annotations

from infra.contract import ConfigError, StageContext, StageOutput

from .config import PretrainConfig
from .trainer import Trainer

Config = PretrainConfig


def input_uris(cfg: PretrainConfig) -> dict[str, str]:
    if not cfg.dataset:
        raise ConfigError(
            "pretrain.dataset: no dataset given; set it to the dataset URI that `moeflow prep` printed "
            "(<store>/prep/<key>/dataset) or to latest:prep, the newest prep output in the store: the field "
            "`dataset` of the pretrain form, or --set dataset=latest:prep on the command line"
        )
    return {"dataset": cfg.dataset}


def run(cfg: PretrainConfig, ctx: StageContext) -> StageOutput:
    if ctx.world_size != cfg.world_size:
        raise ConfigError(
            f"the job runs {ctx.world_size} process(es) but resources asks for {cfg.world_size} "
            f"(procs_per_node {cfg.resources.procs_per_node} x nodes {cfg.resources.nodes})"
        )
    result = Trainer(cfg, ctx).train()
    return StageOutput(outputs=result["outputs"], metrics=result["metrics"], extra={"ledger": result["ledger"]})
