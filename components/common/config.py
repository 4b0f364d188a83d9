"""Config pieces every training stage shares: the strict base model, model presets, the optimizer, the
learning-rate schedule and checkpointing.

Every stage config is built from `Strict` models (unknown keys are errors, assignments are validated), so a
typo in a preset fails at once with the field's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


class Strict(BaseModel):
    """A config model that rejects unknown keys and validates assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_model(data: Any) -> Any:
    """Expand `{preset: NAME | PATH, **overrides}` into a full model-config dict; a Hugging Face
    ``config.json`` (it has ``model_type`` or ``architectures``) becomes moeflow's fields through its
    family's ``from_hf_dict`` (``model_type`` picks DeepSeek-V3, Llama or Qwen2; its
    ``quantization_config`` describes stored weights, not the architecture, and is set aside); moeflow's
    own dump of a dense family (``model_type`` and moeflow's fields) stays as it is. Other input unchanged."""
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data) and "preset" not in data:
        from components.model.dense_config import config_from_hf_dict, is_hf_config

        if not is_hf_config(data):
            return data
        arch = {k: v for k, v in data.items() if k != "quantization_config"}
        return config_from_hf_dict(arch).model_dump()
    if not isinstance(data, dict) or "preset" not in data:
        return data
    data = dict(data)
    name = str(data.pop("preset"))
    path = Path(name)
    if not path.suffix:
        path = MODEL_PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml")))
        raise ValueError(f"model preset {name!r} not found (known presets: {known}, or a path to a YAML file)")
    import yaml

    base = yaml.safe_load(path.read_text()) or {}
    if not isinstance(base, dict):
        raise ValueError(f"{path}: expected a mapping of model config fields")
    return {**base, **data}


class OptimConfig(Strict):
    """AdamW with decoupled weight decay (not applied to norms, biases and the router's balancing bias)."""

    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam beta1, beta2 (DeepSeek-V3: 0.9, 0.95)")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay of the matrices (DeepSeek-V3: 0.1)")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = no clipping)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas {v} must each lie in [0, 1)")
        return v


class ScheduleConfig(Strict):
    """Learning-rate schedule: linear warm-up, then cosine decay, warmup-stable-decay, or constant."""

    kind: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="cosine: decay to min_lr_ratio*lr over the steps after warm-up; wsd: hold the "
        "peak, then decay over the last decay_fraction of the steps (DeepSeek-V3's shape); constant: hold"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to the peak")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of all steps spent decaying")
    decay_shape: Literal["linear", "cosine"] = Field("cosine", description="wsd: shape of the final decay")


class CheckpointConfig(Strict):
    """Checkpoints under `<stage output>/checkpoints/step_XXXXXXX/`, published atomically."""

    every: int = Field(100, ge=1, description="save every N steps (and always at the end)")
    keep: int = Field(2, ge=1, description="keep the newest K checkpoints, delete older ones")
    resume: bool = Field(True, description="resume from the newest complete checkpoint when one exists")
