"""Torch references of every moeflow kernel (one per op; never imports triton).

They are the CPU fallback of the dispatch layer, the oracle of the kernel tests and the baseline of the
benchmarks alike.
"""

from .chunked import chunked_linear_loss, default_chunk_size
from .cross_entropy import cross_entropy_rows, fused_linear_cross_entropy
from .distill import distill_loss, distill_rows, fused_linear_distill_loss
from .fp8 import fp8_dequantize, fp8_gemm, fp8_linear, fp8_quantize_act, fp8_quantize_weight
from .moe import (
    MoeRouting,
    grouped_gemm,
    grouped_swiglu_mlp,
    moe_combine,
    moe_ffn,
    moe_ffn_loop,
    moe_permute,
    moe_routing,
)
from .rms_norm import rms_norm, rms_norm_bwd
from .rope import apply_rope, rope_cos_sin, rope_inv_freq
from .swiglu import swiglu, swiglu_bwd

__all__ = [
    "MoeRouting",
    "apply_rope",
    "chunked_linear_loss",
    "cross_entropy_rows",
    "default_chunk_size",
    "distill_loss",
    "distill_rows",
    "fp8_dequantize",
    "fp8_gemm",
    "fp8_linear",
    "fp8_quantize_act",
    "fp8_quantize_weight",
    "fused_linear_cross_entropy",
    "fused_linear_distill_loss",
    "grouped_gemm",
    "grouped_swiglu_mlp",
    "moe_combine",
    "moe_ffn",
    "moe_ffn_loop",
    "moe_permute",
    "moe_routing",
    "rms_norm",
    "rms_norm_bwd",
    "rope_cos_sin",
    "rope_inv_freq",
    "swiglu",
    "swiglu_bwd",
]
