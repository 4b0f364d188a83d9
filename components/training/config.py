"""`PretrainConfig`: everything the pretraining stage needs, as nested, documented pydantic models.

The model is a `components.model.config.ModelConfig` (Hugging Face `DeepseekV3Config` field names); in YAML
it may name a preset (`model: {preset: tiny, num_hidden_layers: 2}` loads `configs/models/tiny.yaml` and
applies the other keys on top). The preset is expanded when the config is validated, so the stage's
content hash covers every model field, not a file name.

Batch arithmetic: `batch_size` sequences make one optimizer step (the global batch, over all ranks);
each rank runs micro-batches of `micro_batch_size` sequences, so gradient accumulation is
`batch_size / (micro_batch_size * world_size)` micro-steps; it must divide exactly (checked at start-up,
when the world size is known).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from components.common.config import CheckpointConfig, OptimConfig, ScheduleConfig, Strict, resolve_model
from components.model.config import ModelConfig
from infra.contract import Resources


class EvalConfig(Strict):
    """Validation loss on a fixed slice of the validation split."""

    every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    max_rows: int = Field(64, ge=1, description="validation sequences used (the first ones of the split)")


class GuardConfig(Strict):
    """What a non-finite loss or gradient norm does."""

    max_skipped_steps: int = Field(
        0, ge=0, description="skip up to this many steps with a non-finite loss/gradient (no update), then "
        "stop; 0 = stop at the first one. Stopping exits with code 4 (diverged) and keeps the last good "
        "checkpoint"
    )


class BalanceConfig(Strict):
    """DeepSeek-V3's auxiliary-loss-free load balancing (the step size is the model's bias_update_speed)."""

    bias_update: bool = Field(True, description="update the routers' balancing bias after every step")
    stop_fraction: float = Field(
        1.0, gt=0, le=1, description="stop updating the bias after this fraction of the steps (DeepSeek-V3 "
        "sets gamma to 0 for the last ~3%: 0.97)"
    )


class ParallelConfig(Strict):
    """Parallelism across the job's processes (torchrun starts them from `resources`): data parallelism
    over all of them (DDP or FSDP2), and optionally expert parallelism within groups of `ep` processes."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicated model, all-reduced gradients; fsdp: FSDP2 fully_shard per block"
    )
    ep: int = Field(
        1, ge=1, description="expert parallelism: the routed experts of each MoE layer are split over groups "
        "of this many processes (E/ep each), tokens exchanged by all-to-all; it must divide the number of "
        "processes and model.n_routed_experts. The other parameters stay data parallel over all processes; "
        "each expert shard is data parallel over its (processes / ep) replicas"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    reshard_after_forward: bool = Field(True, description="fsdp: free gathered parameters after forward")



class MetricsConfig(Strict):
    """What is logged to MLflow (rank 0, batched) and what the efficiency ledger assumes."""

    log_every: int = Field(10, ge=1, description="log metrics and a progress line every N steps")
    price_per_device_hour: float = Field(2.0, ge=0, description="USD per device-hour (DeepSeek-V3 used $2/GPU-h)")
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak for MFU in TFLOP/s; None = the GPU's datasheet bf16 figure, or "
        "on CPU a GEMM peak measured at start-up"
    )
    load_warmup_steps: int | None = Field(
        None, ge=0, description="steps ignored by the expert-load summary (None = schedule.warmup_steps)"
    )


class PretrainConfig(Strict):
    """The pretraining stage: a MoE language model trained on a prepared dataset."""

    dataset: str | None = Field(
        None, description="URI of the prepared dataset (the `dataset_uri` `moeflow prep` prints): a path, "
        "file:// or s3://"
    )
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig.model_validate(resolve_model({"preset": "tiny"})),
        description="model architecture (DeepseekV3Config names); `preset: NAME` loads configs/models/NAME.yaml",
    )
    vocab_from_dataset: bool = Field(
        True, description="set model.vocab_size (and bos/eos/pad ids) from the dataset's tokenizer"
    )
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward/backward on one rank")
    seq_len: int | None = Field(
        None, ge=2, description="tokens per sequence (None = the dataset's; smaller crops its rows)"
    )
    seed: int = Field(0, description="seed of the initialisation and the data order")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="learning-rate schedule")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation loss")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    guards: GuardConfig = Field(default_factory=GuardConfig, description="non-finite loss/gradient handling")
    balance: BalanceConfig = Field(default_factory=BalanceConfig, description="expert load balancing")
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description="DDP / FSDP2 and expert parallelism (`distributed` is "
        "accepted as the section's former name)"
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="MLflow metrics and ledger")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU (fp32 master weights either way)"
    )
    deterministic: bool = Field(
        False, description="deterministic algorithms (on CPU a resumed run then equals an uninterrupted one "
        "bit for bit)"
    )
    threads: int = Field(0, ge=0, description="CPU threads per process (0 = the cores / processes per node)")
    compile: bool = Field(
        False, description="torch.compile the model's training forward passes (one graph each; inductor, or the "
        "backend MOEFLOW_COMPILE_BACKEND names; generation stays eager)"
    )
    resources: Resources = Field(default_factory=Resources, description="processes, nodes, GPUs of the job")

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "distributed" in data:
            if "parallel" in data:
                raise ValueError("give either parallel or distributed (its former name), not both")
            data = {**data, "parallel": data["distributed"]}
            del data["distributed"]
        return data

    @field_validator("model", mode="before")
    @classmethod
    def _expand_preset(cls, v: Any) -> Any:
        return resolve_model(v)

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size}); "
                "lower micro_batch_size"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.seq_len is not None and self.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"seq_len ({self.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        r = self.resources
        if r.gpus and r.procs_per_node > r.gpus:
            raise ValueError(
                f"resources.procs_per_node ({r.procs_per_node}) exceeds resources.gpus ({r.gpus}): "
                "run one process per GPU"
            )
        p = self.parallel
        if self.device == "cuda" and p.backend == "gloo" and p.strategy == "fsdp":
            raise ValueError("parallel.backend gloo with FSDP on GPU is not supported; use nccl (or auto)")
        if self.model.n_routed_experts % p.ep:
            raise ValueError(
                f"parallel.ep ({p.ep}) must divide model.n_routed_experts ({self.model.n_routed_experts})"
            )
        if p.ep > 1 and self.world_size % p.ep:
            raise ValueError(
                f"parallel.ep ({p.ep}) must divide the number of processes (resources.procs_per_node x "
                f"resources.nodes = {self.world_size})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.resources.procs_per_node * self.resources.nodes

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; raises ValueError naming the fields when inexact."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size x world size "
                f"({self.micro_batch_size} x {world_size} = {per_step}); change batch_size or micro_batch_size"
            )
        return self.batch_size // per_step
