"""The one list of moeflow's stages: everything else (the CLI's commands, `moeflow pipeline`'s sections, the
job entry point, prefect.yaml's deployments and the docs' tables) derives from it or is checked against it.

A stage is
- a package under `components/` whose `stage` module provides `Config`, `input_uris(cfg)` and
  `run(cfg, ctx)` (see `infra.contract.StageImpl`),
- a flow module under `flows/` providing the Prefect flow, `run(config) -> summary`,
  `summarize(StageResult) -> summary` and `describe(summary) -> str` (see `FlowModule`),
- a CLI command, and a place in the pipeline (`PIPELINE`, in order).
Adding a stage means adding its package, its flow module and one entry below (docs/architecture.md has the
whole recipe). Modules are imported only when used, so reading the registry costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from pydantic import BaseModel

from infra.contract import ConfigError, StageImpl, StageResult
from infra.plan import StagePlan, plan_stage, validate_config
from infra.settings import Settings


class FlowModule(Protocol):
    """What a stage's flow module (flows/<stage>.py) provides besides the `@flow` itself."""

    def run(self, config: dict[str, Any]) -> dict[str, Any]: ...

    def summarize(self, result: StageResult) -> dict[str, Any]: ...

    def describe(self, summary: dict[str, Any]) -> str: ...


@dataclass(frozen=True)
class Stage:
    """One stage: where its code lives, how users reach it, and its place in the pipeline."""

    name: str  # the stage's name: job name, store folder, MLflow run name, preset section
    package: str  # components.<package>: `stage` module with Config / input_uris / run
    flow: str  # "flows/<module>.py:<flow function>", as prefect.yaml's entrypoint names it
    command: tuple[str, ...]  # the CLI words that run it: ("prep",) or ("release", "run")
    help: str  # one line: the CLI's help and the deployment's description
    tags: tuple[str, ...] = ("moeflow",)
    # the output a reference `latest:<stage>` names (what the pipeline passes on to the next stage)
    output: str = field(kw_only=True)

    @property
    def impl(self) -> StageImpl:
        return importlib.import_module(f"{self.package}.stage")  # type: ignore[return-value]

    @property
    def config_class(self) -> type[BaseModel]:
        return self.impl.Config

    @property
    def flow_module(self) -> FlowModule:
        return importlib.import_module(module_of(self.flow))  # type: ignore[return-value]

    def validate(self, data: dict[str, Any], *, source: str = "config", overrides: Sequence[str] = ()) -> BaseModel:
        return validate_config(self.name, self.config_class, data, source=source, overrides=overrides)

    def plan(self, data: dict[str, Any], settings: Settings | None = None, *, source: str = "config",
             overrides: Sequence[str] = ()) -> StagePlan:
        return plan_stage(self.name, self.impl, data, settings, source=source, overrides=overrides)


@dataclass(frozen=True)
class ExtraFlow:
    """A deployed flow that is not one stage (the pipeline, the scheduled champion evaluation)."""

    name: str
    flow: str
    help: str
    tags: tuple[str, ...] = ("moeflow",)


def module_of(entrypoint: str) -> str:
    """`flows/prep.py:prep_flow` -> `flows.prep`."""
    return entrypoint.partition(":")[0].removesuffix(".py").replace("/", ".")


def load_flow(entrypoint: str) -> Any:
    """`flows/prep.py:prep_flow` -> the flow object."""
    return getattr(importlib.import_module(module_of(entrypoint)), entrypoint.partition(":")[2])


PIPELINE: tuple[Stage, ...] = (
    Stage("prep", "components.data", "flows/prep.py:prep_flow", ("prep",),
          "Prepare a tokenised, packed dataset with held-out evaluation tasks.", ("moeflow", "data"),
          output="dataset"),
    Stage("pretrain", "components.training", "flows/pretrain.py:pretrain_flow", ("pretrain",),
          "MoE pretraining (DDP/FSDP2 via torchrun; resumes from its newest checkpoint).", ("moeflow", "training"),
          output="checkpoint"),
    Stage("rl", "components.rl", "flows/rl.py:rl_flow", ("rl",),
          "R1-style GRPO with verifiable rewards (R1-Zero or cold-start R1).", ("moeflow", "training"),
          output="checkpoint"),
    Stage("distill", "components.distill", "flows/distill.py:distill_flow", ("distill",),
          "Rejection-sampled traces from a teacher, then student SFT and logit distillation.",
          ("moeflow", "training"), output="student"),
    Stage("eval", "components.eval", "flows/eval.py:eval_flow", ("eval",),
          "Evaluate several models side by side (quality and efficiency).", ("moeflow", "eval"),
          output="report"),
    Stage("release", "components.release", "flows/release.py:release_flow", ("release", "run"),
          "Package, publish, register and (if the gate passes) promote a release.", ("moeflow", "release"),
          output="release"),
)
STAGES: dict[str, Stage] = {s.name: s for s in PIPELINE}

EXTRA_FLOWS: tuple[ExtraFlow, ...] = (
    ExtraFlow("pipeline", "flows/pipeline.py:pipeline_flow",
              "The whole lifecycle, prep -> pretrain -> RL -> distill -> eval -> release.", ("moeflow", "pipeline")),
    ExtraFlow("eval-champion", "flows/eval.py:eval_champion_flow",
              "Nightly evaluation of the champion model; appends to its history plot.",
              ("moeflow", "eval", "schedule")),
)


def get(name: str) -> Stage:
    """The stage called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}") from None


def stage_impl(name: str) -> ModuleType:
    """The stage's implementation module (what the job entry point runs)."""
    return get(name).impl  # type: ignore[return-value]
