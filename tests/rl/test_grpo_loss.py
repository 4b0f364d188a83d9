"""GRPO loss and advantages against a reference written from the formulas with Python loops."""

import statistics

import pytest
import torch

from components.rl.grpo import (
    aggregation_denominator,
    filter_degenerate_groups,
    group_advantages,
    grpo_loss,
    mask_truncated,
)

B, T = 6, 9


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0)  # ratios ~ e^±0.4
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[2] = False  # one sequence with no valid token (e.g. truncated and masked out)
    mask[4, 0] = False  # a hole inside a sequence
    return logp.requires_grad_(), old, ref, adv, mask


def _reference(logp, old, adv, mask, ref, beta, eps_low, eps_high, aggregation, max_len):
    """The formulas, one token at a time."""
    seq_means, total, count, clipped = [], 0.0, 0, 0
    for i in range(B):
        seq_sum, seq_count = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            if rho < 1 - eps_low:
                rho_clipped = torch.tensor(1 - eps_low, dtype=rho.dtype)
            elif rho > 1 + eps_high:
                rho_clipped = torch.tensor(1 + eps_high, dtype=rho.dtype)
            else:
                rho_clipped = rho
            unclipped_term, clipped_term = rho * adv[i], rho_clipped * adv[i]
            if clipped_term < unclipped_term:
                clipped += 1
            token_loss = -(unclipped_term if unclipped_term <= clipped_term else clipped_term)
            if ref is not None and beta != 0:
                token_loss = token_loss + beta * (torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1)
            seq_sum, seq_count = seq_sum + token_loss, seq_count + 1
        total, count = total + seq_sum, count + seq_count
        if seq_count:
            seq_means.append(seq_sum / seq_count)
    if aggregation == "grpo":
        loss = sum(seq_means) / len(seq_means)
    elif aggregation == "dr_grpo":
        loss = total / (B * (T if max_len is None else max_len))
    else:
        loss = total / count
    return loss, clipped / count


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_gradient_match_the_reference(aggregation, beta, eps_low, eps_high):
    seed = 4 * ["grpo", "dr_grpo", "dapo"].index(aggregation) + 2 * (beta > 0) + (eps_high != eps_low)
    logp, old, ref, adv, mask = _inputs(seed)
    kwargs = dict(ref_logp=ref, beta=beta, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation)
    loss, stats = grpo_loss(logp, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    expected, clip_fraction = _reference(logp, old, adv, mask, ref, beta, eps_low, eps_high, aggregation, None)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert grad[2].abs().sum() == 0 and grad[4, 0] == 0  # masked tokens get no gradient
    assert stats["clip_fraction"] == pytest.approx(clip_fraction)
    assert 0 < stats["clip_fraction"] < 1  # the inputs do exercise the clip


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_rows_without_signal_can_be_left_out_given_the_full_denominator(aggregation):
    """What the trainer does with degenerate groups at beta = 0: the loss and gradient do not change."""
    logp, old, _, adv, mask = _inputs(seed=9)
    adv = adv.detach().clone()
    adv[[0, 3]] = 0.0  # two sequences of all-equal groups
    full, _ = grpo_loss(logp, old, adv, mask, aggregation=aggregation)
    (full_grad,) = torch.autograd.grad(full, logp)
    keep = adv != 0
    part_logp = logp.detach()[keep].requires_grad_()
    denominator = aggregation_denominator(mask, aggregation)
    part, _ = grpo_loss(part_logp, old[keep], adv[keep], mask[keep], aggregation=aggregation, denominator=denominator)
    (part_grad,) = torch.autograd.grad(part, part_logp)
    torch.testing.assert_close(part, full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(part_grad, full_grad[keep], atol=1e-12, rtol=1e-12)
    alone, _ = grpo_loss(part_logp, old[keep], adv[keep], mask[keep], aggregation=aggregation)
    assert not torch.allclose(alone, full)  # the rows' own denominator would be another loss
    with pytest.raises(ValueError, match="denominator"):
        grpo_loss(logp, old, adv, mask, aggregation=aggregation, denominator=0.0)


def test_dr_grpo_divides_by_the_given_max_len():
    logp, old, ref, adv, mask = _inputs(seed=1)
    loss_T, _ = grpo_loss(logp, old, adv, mask, aggregation="dr_grpo")
    loss_4T, _ = grpo_loss(logp, old, adv, mask, aggregation="dr_grpo", max_len=4 * T)
    expected, _ = _reference(logp, old, adv, mask, None, 0.0, 0.2, 0.2, "dr_grpo", 4 * T)
    torch.testing.assert_close(loss_4T.double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_4T * 4, loss_T)


def test_no_kl_term_without_reference_or_with_zero_beta():
    logp, old, ref, adv, mask = _inputs(seed=2)
    plain, stats_plain = grpo_loss(logp, old, adv, mask, beta=0.1)
    zero_beta, stats_zero = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.0)
    with_kl, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    assert plain.item() == zero_beta.item() != with_kl.item()
    assert "kl" not in stats_plain
    valid = mask.bool()
    log_ratio = (ref - logp.detach())[valid]
    expected_kl = (torch.exp(log_ratio) - log_ratio - 1).mean().item()
    assert stats_zero["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert stats_zero["kl"] > 0


def test_on_policy_gradient_is_minus_advantage_over_sequence_length():
    logp, old, _, adv, mask = _inputs(seed=3)
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask)  # rho == 1: nothing is clipped
    (grad,) = torch.autograd.grad(loss, logp)
    lengths = mask.sum(1)
    n_seqs = int((lengths > 0).sum())
    expected = -adv[:, None] / lengths.clamp(min=1)[:, None] / n_seqs * mask
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)


def test_low_precision_inputs_give_a_float32_loss():
    logp, old, ref, adv, mask = _inputs(seed=4)
    loss, _ = grpo_loss(logp.detach().bfloat16().requires_grad_(), old.bfloat16(), adv, mask.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_fully_masked_batch_gives_zero_loss_with_a_graph():
    logp, old, _, adv, mask = _inputs(seed=5)
    for aggregation in ("grpo", "dr_grpo", "dapo"):
        loss, stats = grpo_loss(logp, old, adv, torch.zeros_like(mask), aggregation=aggregation)
        assert loss.item() == 0.0 and loss.requires_grad and stats["n_tokens"] == 0


def test_shape_mismatch_is_rejected():
    logp, old, _, adv, mask = _inputs(seed=6)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, adv, mask, aggregation="mean")


def test_group_advantages_match_per_group_formulas():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.2, 0.0, 0.0]])
    flat = rewards.flatten().tolist()
    batch_std = statistics.stdev(flat)
    group = group_advantages(rewards, "group")
    batch = group_advantages(rewards, "batch")
    none = group_advantages(rewards, "none")
    for p, row in enumerate(rewards.tolist()):
        mean, std = statistics.fmean(row), statistics.stdev(row)
        for g, r in enumerate(row):
            assert group[p, g].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
            assert batch[p, g].item() == pytest.approx((r - mean) / (batch_std + 1e-6), abs=1e-5)
            assert none[p, g].item() == pytest.approx(r - mean, abs=1e-6)
    assert torch.equal(group[1], torch.zeros(4))  # all-equal group: zero advantage, not NaN
    for value in (0.1, 1.1, 0.085):  # float32 means of 8 equal rewards that miss the value by an ulp
        for scale in ("group", "batch", "none"):
            assert torch.equal(group_advantages(torch.full((2, 8), value), scale), torch.zeros(2, 8)), (value, scale)
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1), "group")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, "rank")


def test_filter_degenerate_groups_drops_groups_with_equal_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3], [0.0, 0.0, 1e-3]])
    assert filter_degenerate_groups(rewards).tolist() == [False, True, False, True]


def test_mask_truncated_removes_whole_sequences_and_keeps_dtype():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([False, True, False])
    out = mask_truncated(mask, truncated)
    assert out.dtype == torch.bool and out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    out_f = mask_truncated(mask.float(), truncated)
    assert out_f.dtype == torch.float32 and out_f.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="truncated"):
        mask_truncated(mask, truncated[:2])
