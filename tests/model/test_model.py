"""The module's own contract: shapes, hidden states, tied head, input checks, FP8 switch, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.model import Transformer


def test_forward_is_head_of_hidden_states_after_final_norm(kit):
    torch.manual_seed(0)
    model = Transformer(kit.cfg()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        h = model.hidden_states(ids)
        logits = model(ids)
        trunk, _ = model._trunk(ids)
    assert h.shape == (2, 9, model.cfg.hidden_size) and logits.shape == (2, 9, model.cfg.vocab_size)
    rms = h.div(model.norm.weight).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)  # normalised
    assert not torch.allclose(trunk, h)
    torch.testing.assert_close(logits, F.linear(h, model.output_weight()))


def test_forward_is_causal(kit):
    torch.manual_seed(1)
    model = Transformer(kit.cfg()).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    ids2 = ids.clone()
    ids2[0, 7] = (ids2[0, 7] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    # Earlier positions see nothing of token 7; their bits may still move by an ulp: the changed token changes
    # its experts' segment lengths, and a GEMM's rounding can depend on how many rows it multiplies.
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-2


def test_tied_head_reads_the_embedding_and_trains_it_once(kit):
    model = Transformer(kit.cfg(tie_word_embeddings=True))
    assert model.output_weight() is model.embed_tokens.weight
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6))
    model.compute_loss(ids, ids).loss.backward()
    assert model.embed_tokens.weight.grad is not None
    assert sum(p is model.embed_tokens.weight for p in model.parameters()) == 1


def test_bad_inputs_are_rejected_with_a_message(kit):
    model = Transformer(kit.cfg(max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model.compute_loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_fp8_switch_routes_block_linears_through_fp8(kit):
    from components.model.layers import Linear

    torch.manual_seed(2)
    fp8 = Transformer(kit.cfg(hidden_size=128, q_lora_rank=128, fp8=True, mtp_depth=1))
    linears = [m for m in fp8.modules() if isinstance(m, Linear)]
    assert linears and all(m.fp8 for m in linears)
    # embedding, output head and router stay out of FP8 (DeepSeek-V3's recipe)
    assert not isinstance(fp8.lm_head, Linear) and not isinstance(fp8.layers[1].mlp.gate, Linear)
    proj = fp8.layers[0].self_attn.q_a_proj
    x = torch.randn(2, 10, 128)
    with torch.no_grad():
        err = ((proj(x) - F.linear(x, proj.weight)).norm() / F.linear(x, proj.weight).norm()).item()
    assert 0.005 < err < 0.08  # e4m3 quantisation noise: present, but small
    ids = torch.randint(0, fp8.cfg.vocab_size, (2, 10))
    out = fp8.compute_loss(ids, ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert proj.weight.grad.abs().sum() > 0


def test_bf16_model_trains_and_routes_in_fp32(kit):
    torch.manual_seed(3)
    model = Transformer(kit.cfg(mtp_depth=1, seq_aux_loss_weight=1e-3)).to(torch.bfloat16).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10))
    out = model.compute_loss(ids, ids)
    assert torch.isfinite(out.loss) and out.aux_loss is not None and out.mtp_loss is not None
    out.loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.dtype == torch.float32
    assert model.layers[1].mlp.experts.w_gate.grad.dtype == torch.bfloat16


def test_forward_accepts_labels_for_wrapped_training(kit):
    """DDP/FSDP wrappers call forward: with labels it returns the same LossOutput as compute_loss."""
    torch.manual_seed(4)
    model = Transformer(kit.cfg(mtp_depth=1))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    a, b = model(ids, labels=ids), model.compute_loss(ids, ids)
    torch.testing.assert_close(a.loss, b.loss)
