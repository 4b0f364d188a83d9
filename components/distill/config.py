"""`DistillConfig`: the distillation stage's typed config (a form in the Prefect UI)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from components.common.config import CheckpointConfig, Strict, resolve_model
from components.model.config import ModelConfig
from components.model.dense_config import LlamaConfig, Qwen2Config, config_from_dict
from components.sft.sft import DistillLossConfig, SFTConfig


class TracesConfig(Strict):
    """Rejection sampling: the teacher answers training prompts; verified-correct, distinct answers are kept."""

    families: list[str] | None = Field(
        None, description="task families to draw prompts from (null: the dataset's evaluation families, else all)")
    n_prompts_per_family: int = Field(500, ge=1, description="training prompts drawn per family")
    task_files: list[str] = Field(default_factory=list, description="user JSONL task files used as prompts too")
    n_samples: int = Field(8, ge=1, description="teacher samples per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the teacher")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the teacher's sampling")
    max_new_tokens: int = Field(96, ge=1, description="length limit of a trace")
    max_per_prompt: int = Field(4, ge=1, description="distinct correct traces kept per prompt")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="prompts held out to measure completion loss")
    seed: int = Field(0, description="seed of the prompts and the samples")


class StudentConfig(Strict):
    """The smaller model: DeepSeek-V3 dense (first_k_dense_replace >= num_hidden_layers) or a smaller MoE, or
    a Llama / Qwen2 model (`model_type: llama | qwen2` with LlamaConfig / Qwen2Config fields)."""

    model: ModelConfig | LlamaConfig | Qwen2Config = Field(
        default_factory=lambda: ModelConfig.model_validate(resolve_model(
            {"preset": "tiny", "hidden_size": 64, "intermediate_size": 192, "first_k_dense_replace": 4,
             "mtp_depth": 0})),
        description="student architecture: `preset: NAME` + overrides (DeepSeek-V3), or `model_type: llama` / "
        "`qwen2` + that family's fields; vocab and special ids are the teacher's")
    init: str | None = Field(None, description="start from this model (URI) instead of a random initialisation")
    seed: int = Field(0, description="seed of the random initialisation")
    max_active_ratio: float | None = Field(
        0.5, gt=0, description="fail unless student active params <= this x the teacher's (null: no check)")

    @field_validator("model", mode="before")
    @classmethod
    def _expand_preset(cls, v: Any) -> Any:
        v = resolve_model(v)
        return config_from_dict(v) if isinstance(v, dict) else v  # model_type picks the family


class DistillConfig(Strict):
    """Distil a teacher (an RL checkpoint or any release) into a student: traces, SFT, logit distillation."""

    teacher: str | None = Field(
        None, description="teacher model: a model/checkpoint URI, a stage output, a release, or models:/NAME@ALIAS")
    dataset: str | None = Field(
        None, description="prepared dataset whose held-out problems are kept out of the traces (null: the one "
        "in the teacher's lineage)")
    traces_uri: str | None = Field(None, description="reuse published traces instead of sampling new ones")
    traces: TracesConfig = Field(default_factory=TracesConfig, description="rejection sampling")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="optimisation and packing")
    logit: DistillLossConfig | None = Field(
        None, description="logit distillation from the teacher (same tokenizer); null = SFT on traces only")
    corpus_max_rows: int = Field(
        4096, ge=1, description="sft.mix_rows_per_batch > 0: the first N train rows of the dataset are the mixed-in "
        "text (the dataset must use the teacher's tokenizer)")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    price_per_device_hour: float = Field(2.0, ge=0, description="USD per device-hour in the stage's cost")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    compile: bool = Field(
        False, description="torch.compile the model's training forward passes (one graph each; inductor, or the "
        "backend MOEFLOW_COMPILE_BACKEND names; generation stays eager)"
    )
