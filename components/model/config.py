"""Model configuration: Hugging Face ``DeepseekV3Config`` field names plus moeflow's training fields.

The HF fields keep their names and meanings so that a ``config.json`` written by ``transformers`` loads
here and ours loads there (``from_hf_dict`` / ``to_hf_dict``). The moeflow fields (``mtp_depth`` ...
``fp8``) exist only on our side and are dropped on export. Every invalid combination is rejected when
the config is built, with a message naming the field and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Keys that transformers writes into any config.json but that carry no meaning for the architectures we
# build (bookkeeping, generation defaults, HF runtime switches). ``from_hf_dict`` drops them (and each
# family's own list); any other unknown key is an error, so a checkpoint with features we do not implement
# is never loaded silently wrong.
HF_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "auto_map", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
        "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label",
        "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
        "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "add_cross_attention",
        "is_decoder", "tf_legacy_loss", "use_bfloat16", "torchscript", "pruned_heads", "attn_implementation",
        "experts_implementation", "pretraining_tp",  # 4.x's tensor-parallel matmul split: same math
    }
)
_HF_IGNORED_KEYS = HF_BOOKKEEPING_KEYS | {
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "topk_method", "scoring_func",
    "ep_size", "moe_layer_freq", "num_key_value_heads", "head_dim", "qk_head_dim", "attention_dropout",
    "attention_bias", "hidden_act", "rope_interleave", "num_nextn_predict_layers", "num_mtp_layers",
    "rope_parameters", "rope_theta", "rope_scaling", "max_window_layers",
}


class HFModelConfig(BaseModel):
    """What every family's config shares (DeepSeek-V3 here, Llama/Qwen2 in ``dense_config``): YAML loading,
    the token-id checks, and reading the parts of a Hugging Face ``config.json`` every family reads alike."""

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def _check_token_ids(self) -> None:
        for name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name} ({tok}) must lie in [0, vocab_size={self.vocab_size})")
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"eos_token_id ({tok}) must lie in [0, vocab_size={self.vocab_size})")

    @classmethod
    def from_yaml(cls, path: str | Path):
        """Load a named preset (``configs/models/*.yaml``); unknown keys are errors naming the key."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        raise NotImplementedError

    @staticmethod
    def _hf_common(d: dict[str, Any], type_key: str, what: str) -> dict[str, Any]:
        """Checks every family makes on a ``config.json`` dict (quantised weights, the activation), and
        RoPE in one form: HF 5.x writes ``rope_parameters {rope_theta, rope_type, factor, ...}``, 4.x and
        DeepSeek ``rope_theta`` + ``rope_scaling {type | rope_type, factor, ...}``. -> a new dict with
        ``rope_theta`` and ``rope_scaling`` (None for plain RoPE, else its kind under ``type_key``)."""
        d = dict(d)
        if "quantization_config" in d:
            raise ValueError(
                "this checkpoint is quantised (quantization_config present); dequantise it to bf16/fp32 "
                "safetensors first"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; moeflow {what} use silu")
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            rs = dict(rs)
            kind = rs.pop("rope_type", None) or rs.pop("type", None)
            rs.pop("type", None)
            d["rope_scaling"] = None if kind in (None, "default") else {type_key: kind, **rs}
        return d


class ModelConfig(HFModelConfig):
    """A DeepSeek-V3-architecture language model (MLA attention, DeepSeekMoE, optional MTP).

    Field names and meanings follow ``transformers.DeepseekV3Config``; the last block holds moeflow's own
    training fields. Build from YAML with ``ModelConfig.from_yaml(path)`` (unknown keys are errors) or
    from a Hugging Face ``config.json`` dict with ``ModelConfig.from_hf_dict(d)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    # --- sizes -------------------------------------------------------------------------------------
    vocab_size: int = Field(129280, gt=0, description="Number of token ids (embedding and output rows).")
    hidden_size: int = Field(7168, gt=0, description="Model width d.")
    intermediate_size: int = Field(18432, gt=0, description="Width of the dense SwiGLU MLP layers.")
    moe_intermediate_size: int = Field(2048, gt=0, description="Width of each routed/shared expert.")
    num_hidden_layers: int = Field(61, gt=0, description="Number of transformer blocks (excluding MTP).")
    num_attention_heads: int = Field(128, gt=0, description="Attention heads H.")
    # --- multi-head latent attention ---------------------------------------------------------------
    q_lora_rank: int | None = Field(
        1536, gt=0, description="Rank of the low-rank query compression; null = a full-rank q_proj."
    )
    kv_lora_rank: int = Field(512, gt=0, description="Rank r of the joint key-value latent (cached).")
    qk_nope_head_dim: int = Field(128, gt=0, description="Per-head query/key dims without RoPE.")
    qk_rope_head_dim: int = Field(64, gt=0, description="Per-head query/key dims with RoPE (shared key).")
    v_head_dim: int = Field(128, gt=0, description="Per-head value dims.")
    # --- DeepSeekMoE -------------------------------------------------------------------------------
    n_routed_experts: int = Field(256, gt=0, description="Routed experts E per MoE layer.")
    n_shared_experts: int = Field(1, ge=0, description="Shared experts (one MLP of n x expert width).")
    num_experts_per_tok: int = Field(8, gt=0, description="Routed experts K chosen per token.")
    n_group: int = Field(8, gt=0, description="Expert groups G for group-limited routing.")
    topk_group: int = Field(4, gt=0, description="Groups kept per token before the top-K choice.")
    norm_topk_prob: bool = Field(True, description="Normalise the K gate weights to sum to one.")
    routed_scaling_factor: float = Field(2.5, gt=0, description="Multiplier on the routed gate weights.")
    first_k_dense_replace: int = Field(3, ge=0, description="The first k layers use a dense MLP.")
    # --- positions, norms, embeddings ----------------------------------------------------------------
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    rope_scaling: dict[str, Any] | None = Field(
        None, description="null, or YaRN: {type: yarn, factor, original_max_position_embeddings, ...}."
    )
    rope_interleave: bool = Field(
        True, description="RoPE on adjacent pairs (DeepSeek's layout); the only layout moeflow implements."
    )
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the block and final RMSNorms.")
    max_position_embeddings: int = Field(4096, gt=0, description="Longest sequence the model supports.")
    tie_word_embeddings: bool = Field(False, description="Share the embedding matrix with the output head.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    hidden_act: Literal["silu"] = Field("silu", description="Activation of every SwiGLU MLP.")
    attention_bias: Literal[False] = Field(False, description="Biases in attention projections (unsupported).")
    bos_token_id: int | None = Field(0, description="Beginning-of-sequence token id.")
    eos_token_id: int | list[int] | None = Field(1, description="End-of-sequence token id(s).")
    pad_token_id: int | None = Field(None, description="Padding token id (null: none).")
    # --- moeflow training fields (not part of the HF config) ------------------------------------------
    mtp_depth: int = Field(0, ge=0, description="Multi-token prediction depth D (0 = no MTP modules).")
    mtp_loss_weight: float = Field(0.3, ge=0, description="lambda: total MTP loss weight (split over D).")
    bias_update_speed: float = Field(1e-3, ge=0, description="gamma: aux-loss-free bias step per update.")
    seq_aux_loss_weight: float = Field(0.0, ge=0, description="alpha: sequence-wise balance loss weight.")
    kernel_backend: Literal["auto", "triton", "torch"] = Field("auto", description="kernels/ backend.")
    fp8: bool = Field(False, description="Run the block linears through kernels.fp8_linear.")

    # ------------------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        E, G = self.n_routed_experts, self.n_group
        if E % G:
            raise ValueError(
                f"n_routed_experts ({E}) must be divisible by n_group ({G}); "
                f"set n_group to a divisor of {E} (e.g. 1)"
            )
        if E // G < 2:
            raise ValueError(
                f"each expert group needs at least 2 experts (group score = sum of its top-2), but "
                f"n_routed_experts/n_group = {E}/{G}; lower n_group to at most {E // 2}"
            )
        if self.topk_group > G:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({G}); lower topk_group")
        if self.num_experts_per_tok > self.topk_group * (E // G):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts available in the "
                f"kept groups (topk_group * n_routed_experts / n_group = {self.topk_group * (E // G)}); "
                "raise topk_group or lower num_experts_per_tok"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers}); set it to at most {self.num_hidden_layers}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        if not self.rope_interleave:
            raise ValueError(
                "rope_interleave: false (rotate-half RoPE on raw weights) is not implemented; moeflow "
                "uses DeepSeek's adjacent-pair layout, set rope_interleave: true"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; use null or type: yarn (DeepSeek-V3's)"
                )
            if "factor" not in self.rope_scaling or "original_max_position_embeddings" not in self.rope_scaling:
                raise ValueError(
                    "rope_scaling (yarn) needs 'factor' and 'original_max_position_embeddings'"
                )
        self._check_token_ids()
        return self

    # --- derived quantities -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        """MoE layers of the main model (MTP blocks are MoE blocks too, counted separately)."""
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def yarn_mscale(self) -> float:
        """YaRN's attention-temperature factor ``0.1 * mscale_all_dim * ln(factor) + 1`` (1 without YaRN)."""
        rs = self.rope_scaling
        if not rs:
            return 1.0
        m_all, factor = rs.get("mscale_all_dim", 0), rs["factor"]
        if not m_all or factor <= 1:
            return 1.0
        return 0.1 * m_all * math.log(factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """Attention scale ``(dn + dr)^-0.5``, times ``mscale**2`` under YaRN (DeepSeek-V3 / HF)."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    # --- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        return super().from_yaml(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Strict construction from a plain dict (YAML, JSON, CLI overrides)."""
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {unknown}; valid keys are the DeepseekV3Config names plus "
                "mtp_depth, mtp_loss_weight, bias_update_speed, seq_aux_loss_weight, kernel_backend, fp8"
            )
        return cls.model_validate(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict for ``transformers.DeepseekV3ForCausalLM`` (no moeflow fields, no MTP).

        RoPE is written in the legacy ``rope_theta`` / ``rope_scaling`` form, which every transformers
        version reads (5.x converts it to ``rope_parameters``).
        """
        d = self.model_dump(
            exclude={"mtp_depth", "mtp_loss_weight", "bias_update_speed", "seq_aux_loss_weight",
                     "kernel_backend", "fp8"}
        )
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            attention_dropout=0.0,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            # Exported checkpoints never carry the MTP modules (inference does not use them).
            num_nextn_predict_layers=0,
            dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x, or DeepSeek's own).

        HF bookkeeping keys are dropped; features moeflow does not implement (attention biases,
        non-SiLU activations, softmax routing, quantised weights, GQA) are errors. ``overrides`` set moeflow
        fields such as ``mtp_depth``.
        """
        if d.get("model_type", "deepseek_v3") != "deepseek_v3":
            raise ValueError(f"model_type is {d['model_type']!r}; only deepseek_v3 checkpoints load here")
        d = cls._hf_common(d, "type", "experts")
        if d.get("attention_bias"):
            raise ValueError("attention_bias: true is not supported by moeflow's MLA")
        if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError("only sigmoid scoring with noaux_tc routing (DeepSeek-V3) is supported")
        nkv = d.get("num_key_value_heads")
        if nkv is not None and nkv != d.get("num_attention_heads", nkv):
            raise ValueError("num_key_value_heads must equal num_attention_heads for MLA")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError("moe_layer_freq != 1 is not supported (every layer after the dense ones is MoE)")
        if d.get("rope_interleave") is False:
            raise ValueError("rope_interleave: false checkpoints are not supported (rotate-half layout)")
        if "num_nextn_predict_layers" not in overrides and "mtp_depth" not in overrides:
            overrides.setdefault("mtp_depth", 0)
        known = set(cls.model_fields)
        unknown = sorted(k for k in d if k not in known and k not in _HF_IGNORED_KEYS)
        if unknown:
            raise ValueError(f"config.json has keys moeflow does not understand: {unknown}")
        data = {k: v for k, v in d.items() if k in known}
        for k in ("n_group", "topk_group"):
            if data.get(k) is None:
                data[k] = 1
        if data.get("first_k_dense_replace") is None:
            data["first_k_dense_replace"] = 0
        if data.get("num_experts_per_tok") is None:
            data.pop("num_experts_per_tok", None)
        if data.get("norm_topk_prob") is None:
            data["norm_topk_prob"] = False
        data.update(overrides)
        return cls.model_validate(data)
