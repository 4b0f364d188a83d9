"""DeepSeekMoE layer: dispatch == per-expert loop, routing rules, aux-loss-free balancing, sequence aux loss."""

from __future__ import annotations

import pytest
import torch

from components.model import Transformer
from components.model.moe import MoE


def _moe(kit, **overrides) -> MoE:
    torch.manual_seed(0)
    model = Transformer(kit.cfg(first_k_dense_replace=0, num_hidden_layers=1, **overrides))
    kit.randomize_biases(model, std=0.05)
    return model.layers[0].mlp


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(2, 16), (3, 41)])  # (B, T); 3 x 41 = an odd token count
def test_kernel_dispatch_equals_per_expert_loop_with_gradients(kit, dtype, atol, shape):
    moe = _moe(kit, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4).to(dtype)
    x = torch.randn(*shape, moe.gate.weight.shape[1], dtype=dtype)
    results = []
    for impl in ("kernel", "loop"):
        moe.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = moe(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
        results.append((y, xi.grad, grads))
    (y_k, dx_k, g_k), (y_l, dx_l, g_l) = results
    torch.testing.assert_close(y_k, y_l, atol=atol, rtol=atol)
    torch.testing.assert_close(dx_k, dx_l, atol=atol, rtol=atol)
    assert set(g_k) == {"gate.weight", "experts.w_gate", "experts.w_up", "experts.w_down",
                        "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                        "shared_experts.down_proj.weight"}
    for name in g_k:
        torch.testing.assert_close(g_k[name], g_l[name], atol=atol, rtol=atol, msg=name)


def test_bias_steers_selection_but_gate_weights_stay_unbiased(kit):
    moe = _moe(kit, n_group=1, topk_group=1, num_experts_per_tok=2)
    x = torch.randn(32, moe.gate.weight.shape[1])
    idx0, _, scores = moe.gate(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 now always wins a slot
    idx, w, scores2 = moe.gate(x)
    assert (idx == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    torch.testing.assert_close(scores, scores2)  # affinities never see the bias
    s = torch.sigmoid(x @ moe.gate.weight.T)
    chosen = s.gather(1, idx)
    expected = chosen / chosen.sum(-1, keepdim=True) * moe.gate.scale  # norm_topk_prob, routed_scaling_factor
    torch.testing.assert_close(w, expected)


def test_bias_is_a_buffer_that_gets_no_gradient(kit):
    moe = _moe(kit)
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    assert "gate.e_score_correction_bias" in moe.state_dict()
    y, _ = moe(torch.randn(2, 8, moe.gate.weight.shape[1]))
    y.sum().backward()
    assert moe.gate.e_score_correction_bias.grad is None
    assert not moe.gate.e_score_correction_bias.requires_grad
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_router_stays_fp32_when_model_is_cast_to_bf16(kit):
    model = Transformer(kit.cfg()).to(torch.bfloat16)
    moe = model.moe_layers()[0]
    assert moe.gate.weight.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.w_gate.dtype == torch.bfloat16
    assert model(torch.randint(0, 50, (1, 5))).dtype == torch.bfloat16


def test_counts_accumulate_in_training_only_and_update_moves_bias_by_gamma(kit):
    torch.manual_seed(4)
    model = Transformer(kit.cfg(bias_update_speed=0.01))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    model.eval()
    model(ids)
    assert model.expert_counts().sum() == 0
    model.train()
    model(ids)
    model(ids)
    counts = model.expert_counts()
    n_moe = model.cfg.num_hidden_layers - model.cfg.first_k_dense_replace
    assert counts.shape == (n_moe, model.cfg.n_routed_experts)
    assert (counts.sum(-1) == 2 * ids.numel() * model.cfg.num_experts_per_tok).all()

    before = torch.stack([m.gate.e_score_correction_bias.clone() for m in model.moe_layers()])
    model.update_expert_bias()
    after = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    load = counts.double()
    mean = load.mean(-1, keepdim=True)
    expected_step = 0.01 * torch.sign(mean - load)  # overloaded: down by gamma; underloaded: up by gamma
    torch.testing.assert_close(after - before, expected_step.float())
    assert (expected_step != 0).any()
    assert model.expert_counts().sum() == 0  # reset after the update


def test_update_with_external_counts_uses_them(kit):
    model = Transformer(kit.cfg(bias_update_speed=0.5))
    E = model.cfg.n_routed_experts
    counts = torch.zeros(len(model.moe_layers()), E, dtype=torch.int64)
    counts[:, 0] = 100  # expert 0 overloaded everywhere, the others starved
    model.update_expert_bias(counts)
    for moe in model.moe_layers():
        b = moe.gate.e_score_correction_bias
        assert b[0] == -0.5 and (b[1:] == 0.5).all()
    with pytest.raises(ValueError, match="n_moe_layers"):
        model.update_expert_bias(torch.zeros(1, E))


def test_repeated_bias_updates_balance_a_skewed_router(kit):
    torch.manual_seed(5)
    moe = _moe(kit, n_group=1, topk_group=1, num_experts_per_tok=2, bias_update_speed=0.02)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    moe.train()
    w0 = moe.gate.weight[0].detach()
    x = torch.randn(4, 64, w0.numel()) + 2.0 * w0 / w0.norm()  # every token leans towards expert 0

    def imbalance():
        moe.expert_counts.zero_()
        with torch.no_grad():
            moe(x)
        load = moe.expert_counts.double()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(60):
        imbalance()
        moe.update_bias()
    end = imbalance()
    assert start > 2.0 and end < 0.6 * start


def test_sequence_aux_loss_matches_its_formula_and_trains_the_router(kit):
    moe = _moe(kit, seq_aux_loss_weight=0.01, n_group=1, topk_group=1)
    moe.train()
    B, T, E, K = 3, 10, moe.n_experts, moe.top_k
    x = torch.randn(B, T, moe.gate.weight.shape[1])
    _, aux = moe(x)
    idx, _, scores = moe.gate(x.view(B * T, -1))
    idx, scores = idx.view(B, T, K), scores.view(B, T, E)
    expected = 0.0
    for b in range(B):
        f = torch.stack([(idx[b] == i).sum() for i in range(E)]).float() * E / (K * T)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * (f * p).sum() / B
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    moe.eval()
    assert moe(x)[1] is None  # no aux loss outside training
