"""Configs of the dense decoder families: Hugging Face ``LlamaConfig`` and ``Qwen2Config`` field names.

Both families are one architecture (pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP, RMSNorm,
optionally tied embeddings); they differ in defaults and in the attention biases (Llama: ``attention_bias``
puts biases on q, k, v and o; Qwen2: q, k and v always carry biases, o never). The HF fields keep their
names and meanings, so a ``config.json`` written by ``transformers`` loads here (``from_hf_dict``) and ours
loads there (``to_hf_dict``). The moeflow fields (``kernel_backend``, ``fp8``) are dropped on export.
Invalid combinations are rejected when the config is built, with a message naming the field.

``config_from_dict`` / ``config_from_hf_dict`` pick the family (DeepSeek-V3, Llama, Qwen2) from
``model_type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, model_validator

from .config import HF_BOOKKEEPING_KEYS, HFModelConfig, ModelConfig

_MOEFLOW_FIELDS = ("kernel_backend", "fp8")
ROPE_TYPES = ("default", "llama3", "yarn")
_ROPE_REQUIRED = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}


class DenseConfig(HFModelConfig):
    """Fields shared by the dense families (see the module docstring); use ``LlamaConfig`` / ``Qwen2Config``."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    model_type: str
    architecture: ClassVar[str]  # the transformers class an export loads as
    family: ClassVar[str]  # the transformers config class named in error messages

    vocab_size: int = Field(32000, gt=0, description="Number of token ids (embedding and output rows).")
    hidden_size: int = Field(4096, gt=0, description="Model width d.")
    intermediate_size: int = Field(11008, gt=0, description="Width of the SwiGLU MLP.")
    num_hidden_layers: int = Field(32, gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(32, gt=0, description="Query heads H.")
    num_key_value_heads: int | None = Field(
        None, gt=0, description="Key/value heads K (GQA); H = MHA, 1 = MQA; null = num_attention_heads."
    )
    head_dim: int | None = Field(None, gt=0, description="Per-head width Dh; null = hidden_size // heads.")
    hidden_act: Literal["silu"] = Field("silu", description="Activation of the SwiGLU MLP.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model supports.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of every RMSNorm.")
    tie_word_embeddings: bool = Field(False, description="Share the embedding matrix with the output head.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    rope_scaling: dict[str, Any] | None = Field(
        None, description="null, {rope_type: llama3, factor, low_freq_factor, high_freq_factor, "
        "original_max_position_embeddings} or {rope_type: yarn, factor, ...}."
    )
    attention_dropout: float = Field(0.0, description="Attention dropout; only 0.0 is implemented.")
    bos_token_id: int | None = Field(1, description="Beginning-of-sequence token id.")
    eos_token_id: int | list[int] | None = Field(2, description="End-of-sequence token id(s).")
    pad_token_id: int | None = Field(None, description="Padding token id (null: none).")
    # --- moeflow fields (not part of the HF config) ----------------------------------------------------
    kernel_backend: Literal["auto", "triton", "torch"] = Field("auto", description="kernels/ backend.")
    fp8: bool = Field(False, description="Run the block linears through kernels.fp8_linear.")

    # ------------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data: Any) -> Any:
        """null num_key_value_heads / head_dim mean what transformers derives (H, hidden_size // H):
        stored explicitly, so a config equals itself after a round trip through config.json."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        heads = data.get("num_attention_heads", cls.model_fields["num_attention_heads"].default)
        hidden = data.get("hidden_size", cls.model_fields["hidden_size"].default)
        rs = data.get("rope_scaling")
        if isinstance(rs, dict) and "rope_theta" in rs:  # transformers 5.x's rope_parameters form
            rs = dict(rs)
            theta = rs.pop("rope_theta")
            if data.setdefault("rope_theta", theta) != theta:
                raise ValueError(
                    f"rope_scaling carries rope_theta {theta}, which contradicts rope_theta "
                    f"{data['rope_theta']}; give rope_theta once, outside rope_scaling"
                )
            data["rope_scaling"] = rs
        if data.get("num_key_value_heads") is None:
            data["num_key_value_heads"] = heads
        if data.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
            if hidden % heads:
                raise ValueError(
                    f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); "
                    "set head_dim explicitly"
                )
            data["head_dim"] = hidden // heads
        return data

    @model_validator(mode="after")
    def _check(self) -> DenseConfig:
        H, K = self.num_attention_heads, self.kv_heads
        if H % K:
            raise ValueError(
                f"num_attention_heads ({H}) must be a multiple of num_key_value_heads ({K}); "
                "every key/value head serves the same number of query heads"
            )
        if self.dim_per_head % 2:
            raise ValueError(f"head_dim ({self.dim_per_head}) must be even (RoPE rotates pairs)")
        if self.attention_dropout != 0.0:
            raise ValueError(f"attention_dropout ({self.attention_dropout}) is not supported; set it to 0.0")
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling rope_type {kind!r} is not supported; use null, llama3 or yarn"
                )
            missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if self.rope_scaling.get(k) is None]
            if missing:
                raise ValueError(f"rope_scaling ({kind}) needs {missing}")
            if kind == "llama3" and self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                raise ValueError("rope_scaling (llama3): high_freq_factor must exceed low_freq_factor")
        self._check_token_ids()
        return self

    # --- derived quantities -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    @property
    def qkv_bias(self) -> bool:
        raise NotImplementedError

    @property
    def o_bias(self) -> bool:
        raise NotImplementedError

    # what the stages ask of any model config: a dense family has no MoE layers and no MTP modules
    @property
    def n_moe_layers(self) -> int:
        return 0

    @property
    def mtp_depth(self) -> int:
        return 0

    @property
    def softmax_scale(self) -> float:
        return self.dim_per_head**-0.5

    # --- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenseConfig:
        """Strict construction from a plain dict (YAML, JSON, overrides); unknown keys name themselves."""
        data = dict(data)
        own = cls.model_fields["model_type"].default
        if data.setdefault("model_type", own) != own:
            raise ValueError(f"model_type is {data['model_type']!r}; a {cls.family} needs model_type: {own}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {unknown}; valid keys are the {cls.family} names plus "
                + ", ".join(_MOEFLOW_FIELDS)
            )
        return cls.model_validate(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict for ``transformers`` (no moeflow fields); RoPE in the legacy
        ``rope_theta`` / ``rope_scaling`` form, which every transformers version reads."""
        d = self.model_dump(exclude=set(_MOEFLOW_FIELDS))
        d.update(
            architectures=[self.architecture],
            num_key_value_heads=self.kv_heads,
            head_dim=self.dim_per_head,
            use_cache=True,
            dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> DenseConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x).

        Bookkeeping keys are dropped; features moeflow does not implement (non-SiLU activations, MLP biases,
        sliding-window attention, quantised weights, other RoPE types) are errors naming the key.
        """
        own = cls.model_fields["model_type"].default
        if d.get("model_type", own) != own:
            raise ValueError(f"model_type is {d['model_type']!r}; a {cls.family} needs {own}")
        d = cls._hf_family_keys(cls._hf_common(d, "rope_type", "MLPs"))
        known = set(cls.model_fields) - set(_MOEFLOW_FIELDS)
        unknown = sorted(k for k in d if k not in known and k not in HF_BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(f"config.json has keys moeflow's {cls.family} does not understand: {unknown}")
        data = {k: v for k, v in d.items() if k in known}
        data["model_type"] = own
        data.update(overrides)
        return cls.model_validate(data)

    @classmethod
    def _hf_family_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Check and drop the family's own HF keys that moeflow does not keep."""
        return d


class LlamaConfig(DenseConfig):
    """A Llama-architecture model (``transformers.LlamaConfig`` names; ``attention_bias`` biases q, k, v, o)."""

    architecture: ClassVar[str] = "LlamaForCausalLM"
    family: ClassVar[str] = "LlamaConfig"
    model_type: Literal["llama"] = "llama"
    attention_bias: bool = Field(False, description="Biases on the q, k, v and o projections.")
    mlp_bias: Literal[False] = Field(False, description="Biases in the MLP (not implemented).")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @classmethod
    def _hf_family_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias: true is not supported; moeflow's MLP has no biases")
        return d


class Qwen2Config(DenseConfig):
    """A Qwen2-architecture model (``transformers.Qwen2Config`` names; q, k, v always carry biases)."""

    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    family: ClassVar[str] = "Qwen2Config"
    model_type: Literal["qwen2"] = "qwen2"
    vocab_size: int = Field(151936, gt=0, description="Number of token ids (embedding and output rows).")
    intermediate_size: int = Field(22016, gt=0, description="Width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(32768, gt=0, description="Longest sequence the model supports.")
    bos_token_id: int | None = Field(None, description="Beginning-of-sequence token id.")
    eos_token_id: int | list[int] | None = Field(None, description="End-of-sequence token id(s).")
    max_window_layers: int = Field(28, ge=0, description="Kept for the round trip (sliding windows are off).")

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False

    def to_hf_dict(self) -> dict[str, Any]:
        d = super().to_hf_dict()
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            d.pop("head_dim")  # Qwen2Config has no head_dim field: transformers derives this one
        d.update(use_sliding_window=False, sliding_window=None)
        return d

    @classmethod
    def _hf_family_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.pop("use_sliding_window", False):
            raise ValueError("use_sliding_window: true is not supported; moeflow attends over the full context")
        d.pop("sliding_window", None)  # unused while use_sliding_window is false
        types = d.pop("layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise ValueError("layer_types other than full_attention (sliding windows) are not supported")
        return d


FAMILIES: dict[str, type[DenseConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}
AnyModelConfig = ModelConfig | LlamaConfig | Qwen2Config


# model_type -> the transformers class a directory of that family loads as
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", **{k: v.architecture for k, v in FAMILIES.items()}}


def model_type_of(cfg: AnyModelConfig) -> str:
    return cfg.model_type if isinstance(cfg, DenseConfig) else "deepseek_v3"


def _family(model_type: Any) -> type[DenseConfig] | type[ModelConfig]:
    if model_type in (None, "deepseek_v3"):
        return ModelConfig
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ValueError(
        f"model_type {model_type!r} is not supported; moeflow builds deepseek_v3, " + ", ".join(FAMILIES)
    )


def config_from_dict(data: dict[str, Any]) -> AnyModelConfig:
    """A moeflow config dict (YAML, a checkpoint's config.json) -> the config of its family.

    ``model_type`` picks the family (absent or ``deepseek_v3``: DeepSeek-V3, whose configs carry no
    ``model_type`` field).
    """
    cls = _family(data.get("model_type"))
    if cls is ModelConfig:
        return ModelConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})
    return cls.from_dict(data)


def config_from_yaml(path: str | Path) -> AnyModelConfig:
    """A model config YAML file (a preset, a trained model's config) -> the config of its family."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return config_from_dict(data)


def config_from_hf_dict(d: dict[str, Any], **overrides: Any) -> AnyModelConfig:
    """A Hugging Face ``config.json`` dict -> the config of its family (by ``model_type``)."""
    return _family(d.get("model_type")).from_hf_dict(d, **overrides)


def is_dense(cfg: Any) -> bool:
    return isinstance(cfg, DenseConfig)


def is_hf_config(raw: dict) -> bool:
    """Whether a ``config.json`` dict is a Hugging Face one (transformers, DeepSeek, ``export_hf``) rather
    than moeflow's own dump (``components.refs.checkpoint.save_model``): moeflow's always carries its
    ``kernel_backend`` field and, for DeepSeek-V3, no ``model_type``; an HF one never has the first and
    always has the second."""
    return "kernel_backend" not in raw and "model_type" in raw
