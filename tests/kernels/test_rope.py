"""Rotary embedding: kernel vs reference, reference vs Hugging Face DeepSeek-V3, YaRN tables vs HF."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.testing import Tol, check_outputs

TOL = {
    torch.float32: Tol(torch.float32, atol=1e-6, rtol=1e-5),
    torch.bfloat16: Tol(torch.bfloat16, atol=1e-3, rtol=0.0, factor=2.0),
}


def _run(fn, x, cos, sin, dy):
    y = fn(x, cos, sin)
    return [y, torch.autograd.grad(y, x, dy.to(y.dtype))[0]]


@pytest.mark.parametrize("shape", [(2, 3, 9, 64), (9, 41, 34), (5, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_kernel_matches_reference(seed, triton_backend, dtype, shape):
    T, D = shape[-2], shape[-1]
    cos, sin = kernels.rope_cos_sin(torch.arange(T) + 3, D, 10000.0)
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape)
    got, want = _run(kernels.apply_rope, x, cos, sin, dy), _run(ref.apply_rope, x, cos, sin, dy)
    oracle = None
    if dtype == torch.bfloat16:
        oracle = _run(ref.apply_rope, x.detach().float().requires_grad_(), cos, sin, dy)
    check_outputs(["y", "dx"], got, want, TOL[dtype], oracle)


def _hf_cos_sin(cos, sin):
    # HF's tables are cat(freqs, freqs) over the full rope dim
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def test_rope_equals_hf_interleave_up_to_the_shared_permutation(seed):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    B, H, T, D = 2, 3, 11, 16
    cos, sin = ref.rope_cos_sin(torch.arange(T), D, 10000.0)
    q, k = torch.randn(B, H, T, D), torch.randn(B, 1, T, D)
    hq, hk = hf.apply_rotary_pos_emb_interleave(q, k, *_hf_cos_sin(cos[None], sin[None]))
    ours_q, ours_k = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
    deinterleave = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    torch.testing.assert_close(ours_q[..., deinterleave], hq)
    torch.testing.assert_close(ours_k[..., deinterleave], hk)
    # ... so attention scores, and therefore logits, are the same
    torch.testing.assert_close(ours_q @ ours_k.transpose(-1, -2), hq @ hk.transpose(-1, -2))


def test_rope_equals_hf_rotate_half_on_permuted_weights(seed):
    """rope_interleave=False in HF needs rows permuted new[i] = old[2i], new[i + D/2] = old[2i+1]."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    T, D = 7, 8
    cos, sin = ref.rope_cos_sin(torch.arange(T), D, 10000.0)
    q = torch.randn(1, 1, T, D)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    hq, _ = hf.apply_rotary_pos_emb(q[..., perm], q[..., perm], *_hf_cos_sin(cos[None], sin[None]))
    torch.testing.assert_close(ref.apply_rope(q, cos, sin)[..., perm], hq)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16,
         "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
    ],
    ids=["default", "yarn-deepseek-v3", "yarn-mscale-ratio", "yarn-no-mscale"],
)
def test_rope_tables_match_hf(scaling):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    if scaling is not None:
        rope = {"rope_theta": 10000.0, **{("rope_type" if k == "type" else k): v for k, v in scaling.items()}}
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=16,
                           v_head_dim=16, kv_lora_rank=32, q_lora_rank=None, max_position_embeddings=1024,
                           rope_parameters=rope)
    hf_rope = DeepseekV3RotaryEmbedding(cfg)
    pos = torch.arange(0, 1000, 37)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos[None])
    cos, sin = ref.rope_cos_sin(pos, 16, 10000.0, scaling=scaling)
    torch.testing.assert_close(cos, hf_cos[0, :, :8], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0, :, :8], atol=1e-6, rtol=1e-6)
    inv_freq, factor = ref.rope_inv_freq(16, 10000.0, scaling)
    torch.testing.assert_close(inv_freq, hf_rope.inv_freq)
    assert factor == pytest.approx(hf_rope.attention_scaling)
