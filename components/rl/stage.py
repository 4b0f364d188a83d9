"""The `rl` stage: a pretrained model in, a GRPO-trained policy out (`<output>/model/`, `<output>/report/`).

Runs inside `moeflow-job rl` (one process). See `components.rl.runner` for what it does and publishes;
`components.rl.config.RLConfig` for the config. Outputs: `checkpoint` (the policy, a model directory),
`report` (summary, per-step history, sample completions, reward-curve PNG), `cold_start` (r1) and `traces`
(with rejection sampling).
"""

from __future__ import annotations

from components.rl.config import RLConfig
from infra.contract import ConfigError, StageContext, StageOutput

Config = RLConfig


def input_uris(cfg: RLConfig) -> dict[str, str]:
    if not cfg.model:
        raise ConfigError(
            "rl.model: no model given; set it to the checkpoint URI that `moeflow pretrain` printed "
            "(<store>/pretrain/<key>/model) or to latest:pretrain, the newest pretrained model in the store: "
            "the field `model` of the rl form, or --set model=latest:pretrain on the command line"
        )
    dataset = cfg.dataset
    if not dataset:
        from components.refs.lineage import lineage_dataset

        dataset = lineage_dataset(cfg.model)
        if not dataset:
            raise ConfigError(
                f"rl.dataset: not given and the lineage of {cfg.model} names no dataset; set it to the "
                "dataset URI that `moeflow prep` printed"
            )
    uris = {"model": cfg.model, "dataset": dataset}
    if cfg.cold_start.traces and cfg.recipe == "r1":
        uris["cold_start_traces"] = cfg.cold_start.traces
    return uris


def run(cfg: RLConfig, ctx: StageContext) -> StageOutput:
    from components.rl.runner import RLRun

    if ctx.world_size != 1:
        raise ConfigError(f"the rl stage runs as one process; the job has {ctx.world_size}")
    return RLRun(cfg, ctx, ctx.inputs).run()
