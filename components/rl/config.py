"""`RLConfig`: the RL stage's typed config (a form in the Prefect UI), nested per concern.

Two recipes (DeepSeek-R1):
- ``r1_zero``: GRPO straight from the pretrained base, rewarded for verified answers and the format;
- ``r1``: a cold-start SFT on a small set of formatted, verified-correct traces first, then GRPO.
Optionally, rejection sampling at the end turns the policy's verified-correct completions into an SFT
dataset (what the distillation stage trains students on).

The defaults are the tiny preset's (2 CPU cores, minutes); `configs/tiny.yaml` spells them out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from components.common.config import CheckpointConfig, OptimConfig, ScheduleConfig, Strict
from components.rl.rewards import RewardConfig
from components.sft.sft import SFTConfig


def _known_families() -> list[str]:
    from components.tasks import FAMILIES

    return sorted(FAMILIES)


class TasksConfig(Strict):
    """The RL prompts: fresh problems of built-in task families, disjoint from the held-out eval split."""

    families: list[str] = Field(default_factory=lambda: ["arithmetic"], description="task families to train on")
    knobs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="difficulty knobs per family, e.g. {arithmetic: {max_operands: 3}} "
        "(default: the family's defaults, those of the dataset's held-out split)")
    n_prompts: int = Field(2000, ge=1, description="problems in the RL prompt pool (drawn per family)")
    seed: int = Field(7, description="seed of the prompt pool (the eval split's ids are always excluded)")

    @field_validator("families")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from components.tasks import check_families

        return check_families(v, allow_empty=False)

    @model_validator(mode="after")
    def _knobs(self) -> TasksConfig:
        from components.tasks import get_family

        extra = sorted(set(self.knobs) - set(self.families))
        if extra:
            raise ValueError(f"knobs name families {extra} that are not in families {self.families}")
        for name, knobs in self.knobs.items():
            get_family(name, **knobs)  # a pydantic ValidationError (a ValueError) names the bad knob
        return self

    def family(self, name: str):
        """The task family `name` with its knobs."""
        from components.tasks import get_family

        return get_family(name, **self.knobs.get(name, {}))


class GRPOConfig(Strict):
    """Group Relative Policy Optimization (DeepSeekMath), with the Dr. GRPO and DAPO variants."""

    steps: int = Field(60, ge=1, description="rollout batches (each followed by `mu` updates)")
    prompts_per_step: int = Field(16, ge=1, description="prompts per rollout batch")
    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt")
    mu: int = Field(1, ge=1, description="mu: policy updates per rollout batch (each over all minibatches)")
    minibatches: int = Field(1, ge=1, description="minibatches each rollout batch is split into per update")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (and of the log-probs)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the rollouts (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k of the rollouts (0 = off)")
    eps_low: float = Field(0.2, ge=0, lt=1, description="clip range below: rho >= 1 - eps_low")
    eps_high: float = Field(0.2, ge=0, description="clip range above: rho <= 1 + eps_high (DAPO: 0.28)")
    beta: float = Field(0.0, ge=0, description="weight of the k3 KL to the frozen reference (0 = no reference model)")
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="loss aggregation: grpo (per-sequence mean), dr_grpo (sum / (B * max_len)), "
        "dapo (token mean over the batch)")
    advantage_scale: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the std of the group, of the batch, or not (Dr. GRPO)")
    mask_truncated: bool = Field(True, description="drop completions cut at the length limit from the loss")
    shared_prompts: bool = Field(
        True, description="policy forward: each prompt once, its G completions against its KV cache (the same "
        "log-probs up to float rounding, fewer tokens); false: one forward per prompt + completion row")
    overlap_rollout: bool = Field(
        False, description="sample the next step's groups in the background (see rollout_worker), from a copy "
        "of the weights before this step's update, while the update runs (one step off-policy: the clipped "
        "ratio to the sampler's log-probs corrects it); each side gets half the torch threads and the copy "
        "costs one more set of weights. Checkpoints and evaluations drain it, so a resumed run repeats the "
        "same samples")
    rollout_worker: Literal["auto", "process", "thread"] = Field(
        "auto", description="overlap_rollout: where the next step's groups are sampled: a process of its own "
        "holding a shared-memory copy of the weights (no Python lock shared with the update; CPU only), or a "
        "thread of the trainer's process (any device); auto: the process on CPU, else the thread. The same "
        "samples either way")
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose rewards are all equal, sample more prompts to refill")
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic sampling: rollout rounds per step at most")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0),
                               description="AdamW")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(kind="constant", warmup_steps=3),
                                     description="learning-rate schedule over the steps")

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.minibatches > self.prompts_per_step:
            raise ValueError(f"minibatches ({self.minibatches}) exceeds prompts_per_step "
                             f"({self.prompts_per_step}); lower minibatches")
        if self.schedule.warmup_steps > self.steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds steps ({self.steps})")
        return self


class ColdStartConfig(Strict):
    """R1's cold start: SFT on a small set of formatted, verified-correct traces before RL."""

    n_examples: int = Field(200, ge=0, description="traces made from the families' worked correct solutions")
    traces: str | None = Field(
        None, description="URI of an SFT dataset (`traces.jsonl` of prompt/completion, e.g. from rejection "
        "sampling) used instead of / besides the generated traces")
    sft: SFTConfig = Field(
        default_factory=lambda: SFTConfig(seq_len=128, batch_size=8, epochs=1.0,
                                          optim=OptimConfig(lr=5e-4, weight_decay=0.0),
                                          schedule=ScheduleConfig(kind="constant", warmup_steps=2)),
        description="SFT optimisation (components.sft.sft)")
    seed: int = Field(11, description="seed of the generated traces")


class HeldOutConfig(Strict):
    """Held-out pass@1 on the dataset's `eval/<family>.jsonl` (components.scoring.evaluate)."""

    family: str = Field("arithmetic", description="held-out family reported as accuracy_start/end")
    n_problems: int = Field(200, ge=1, description="first N problems of the held-out split")
    n_samples: int = Field(4, ge=1, description="samples per problem (pass@1 is averaged over them)")
    temperature: float = Field(0.6, gt=0, description="evaluation temperature (DeepSeek-R1: 0.6)")
    top_p: float = Field(0.95, gt=0, le=1, description="evaluation nucleus mass (DeepSeek-R1: 0.95)")
    max_new_tokens: int = Field(96, ge=1, description="generation limit of an evaluation completion")
    every: int = Field(0, ge=0, description="also evaluate every N steps (0 = at the start and the end only)")
    batch_size: int = Field(64, ge=1, description="problems per generation batch")
    seed: int = Field(0, description="seed of the evaluation samples (same at every evaluation)")


class SamplesConfig(Strict):
    """Tables of sample completions (MLflow artifacts; the flow publishes them as a Prefect table)."""

    every: int = Field(20, ge=1, description="record sample completions every N steps (and at the last)")
    n: int = Field(4, ge=1, description="completions recorded per interval (one per prompt)")


class RejectionConfig(Strict):
    """Rejection sampling after RL: verified-correct, deduplicated completions become an SFT dataset."""

    enabled: bool = Field(False, description="publish `<output>/traces/` (an SFT dataset) after RL")
    n_problems: int = Field(500, ge=1, description="fresh problems per family (disjoint from prompts and eval)")
    n_samples: int = Field(4, ge=1, description="samples per problem")
    temperature: float = Field(0.6, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus mass")
    seed: int = Field(23, description="seed of the problems and the samples")


class RLConfig(Strict):
    """The RL stage: a pretrained model in, a GRPO-trained policy (and optionally traces) out."""

    model: str | None = Field(
        None, description="URI of the pretrained model (the `checkpoint_uri` `moeflow pretrain` prints)")
    dataset: str | None = Field(
        None, description="prepared dataset URI whose eval split gives held-out accuracy (null: the dataset in "
        "the model's lineage)")
    recipe: Literal["r1_zero", "r1"] = Field(
        "r1_zero", validation_alias=AliasChoices("recipe", "pipeline"),
        description="r1_zero: RL from the base; r1: cold-start SFT, then RL (DeepSeek-R1's two recipes; "
        "`pipeline`, its former name, is still read)")
    tasks: TasksConfig = Field(default_factory=TasksConfig, description="RL prompts")
    rewards: RewardConfig = Field(
        default_factory=lambda: RewardConfig(max_completion_len=64, overlong_cache_len=16),
        description="reward weights; max_completion_len is also the rollouts' token limit")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="the GRPO trainer")
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig, description="r1: cold-start SFT")
    eval: HeldOutConfig = Field(default_factory=HeldOutConfig, description="held-out pass@1")
    samples: SamplesConfig = Field(default_factory=SamplesConfig, description="sample-completion tables")
    rejection: RejectionConfig = Field(default_factory=RejectionConfig, description="rejection sampling")
    checkpoint: CheckpointConfig = Field(default_factory=lambda: CheckpointConfig(every=20, keep=1),
                                         description="checkpoints (resume after a crash or retry)")
    log_every: int = Field(5, ge=1, description="log a progress line every N steps (metrics: every step)")
    seed: int = Field(0, description="seed of the rollouts and the prompt order")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = the available cores)")
    compile: bool = Field(
        False, description="torch.compile the model's training forward passes (one graph each; inductor, or the "
        "backend MOEFLOW_COMPILE_BACKEND names; generation stays eager)"
    )

    @field_validator("eval")
    @classmethod
    def _eval_family(cls, v: HeldOutConfig) -> HeldOutConfig:
        known = _known_families()
        if v.family not in known:
            raise ValueError(f"eval.family {v.family!r} is not a task family; choose from {known}")
        return v
