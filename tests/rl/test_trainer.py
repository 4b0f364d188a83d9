"""The GRPO trainer: policy log-probs, the update against a written-out reference, dynamic sampling, mu
updates, the reference model, the prompt stream and resume."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from components.model import DenseForCausalLM, ModelConfig, Qwen2Config, Transformer
from components.model.compile import compile_model
from components.model.generate import GenerationResult
from components.rl.config import GRPOConfig
from components.rl.grpo import group_advantages
from components.rl.rewards import RewardConfig
from components.rl.sampler import GroupSampler, SamplerProcess, frozen_copy
from components.rl.trainer import (
    IGNORE_INDEX,
    GRPOTrainer,
    PromptStream,
    build_batch,
    token_logprobs,
)

# (dtype, atol, rtol) of the comparisons: everything runs in float32 on the CPU
ATOL, RTOL = 1e-5, 1e-4
REPO = Path(__file__).resolve().parents[2]
REWARDS = RewardConfig(max_completion_len=16, overlong_cache_len=4)


def random_model(vocab: int = 97, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return Transformer(cfg)


def fake_results(prompt_lens: list[int], comp_lens: list[int], vocab: int, seed: int):
    """Random prompts and completions (as the generator would return them, logprobs unused here)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    results = []
    for i, n in enumerate(comp_lens):
        toks = torch.randint(3, vocab, (n,), generator=g).tolist()
        results.append(GenerationResult(tokens=toks, logprobs=[-1.0] * n, finish_reason="length" if i % 3 == 0
                                        else "stop", prompt_index=i % len(prompts), sample_index=0))
    return prompts, results


def random_qwen2(vocab: int = 97, seed: int = 0) -> DenseForCausalLM:
    """A dense student family (GQA with q/k/v biases): its KV cache, not MLA's latents, carries the prompt."""
    torch.manual_seed(seed)
    return DenseForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=2))


@pytest.mark.parametrize("family", ["moe", "qwen2"])
@pytest.mark.parametrize("shared_prompts", [False, True], ids=["row-forward", "shared-prompts"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_a_per_sequence_full_softmax_with_gradients(temperature, shared_prompts, family):
    """Both policy forwards (one per row; each prompt once with its completions against its KV cache) equal
    one full forward per sequence, log-probs and gradients; ragged prompts, each shared by two rows."""
    model = random_model() if family == "moe" else random_qwen2()
    prompts, results = fake_results([5, 9, 2], [7, 1, 12, 4, 9, 3], vocab=97, seed=1)
    batch = build_batch(prompts, results, pad_id=2)
    logp_BT, entropy = token_logprobs(model, batch, temperature, with_entropy=True, shared_prompts=shared_prompts)
    (logp_BT * torch.linspace(0.5, 1.5, logp_BT.numel()).view_as(logp_BT)).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_model = copy.deepcopy(model)
    ref_model.zero_grad(set_to_none=True)
    weights = torch.linspace(0.5, 1.5, logp_BT.numel()).view_as(logp_BT)
    total, ent_sum, n_tok = 0.0, 0.0, 0
    for b, r in enumerate(results):  # one sequence at a time, no padding, full (T, V) logits
        p = prompts[r.prompt_index]
        ids = torch.tensor([p + r.tokens])
        logits = ref_model(ids)[0, len(p) - 1 : len(p) - 1 + len(r.tokens)] / temperature
        logp_all = logits.log_softmax(-1)
        lp = logp_all.gather(1, torch.tensor(r.tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(logp_BT[b, : len(r.tokens)].detach(), lp.detach(), atol=ATOL, rtol=RTOL)
        assert torch.all(logp_BT[b, len(r.tokens):] == 0)
        total = total + (lp * weights[b, : len(r.tokens)]).sum()
        ent_sum += float(-(logp_all.exp() * logp_all).sum().detach())
        n_tok += len(r.tokens)
    total.backward()
    for n, p in ref_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got_grads[n], p.grad, atol=ATOL, rtol=RTOL, msg=f"gradient of {n}")
    assert set(got_grads) == {n for n, p in ref_model.named_parameters() if p.grad is not None}
    assert entropy == pytest.approx(ent_sum / n_tok, rel=1e-5)


def test_token_logprobs_of_empty_completions_are_zero_and_differentiable():
    """Completions that stopped at once leave no real token: the output layer gets none, the log-probs are 0
    and the loss still backpropagates (to nothing)."""
    model = random_model()
    prompts, results = fake_results([5, 3], [0, 0, 0], vocab=97, seed=3)
    batch = build_batch(prompts, results, pad_id=2)
    for shared in (False, True):
        logp_BT, _ = token_logprobs(model, batch, 0.7, shared_prompts=shared)
        assert logp_BT.shape == (3, 1) and torch.all(logp_BT == 0)
        logp_BT.sum().backward()


def test_build_batch_marks_completion_tokens_and_truncation():
    prompts, results = fake_results([4, 6], [3, 5, 1], vocab=50, seed=2)
    batch = build_batch(prompts, results, pad_id=2)
    assert batch.targets_BT.shape == (3, 5) and batch.input_ids_BL.shape == (3, 11)
    assert batch.valid_BT.sum(1).tolist() == [3, 5, 1]
    assert torch.all(batch.targets_BT[~batch.valid_BT] == IGNORE_INDEX)
    assert batch.truncated_B.tolist() == [True, False, False]
    # row 1 = prompt 1 + its completion, then padding
    assert batch.input_ids_BL[1].tolist() == prompts[1] + results[1].tokens
    assert batch.input_ids_BL[2, 5:].tolist() == [2] * 6


def test_generator_logprobs_are_the_policys_logprobs(tiny_base):
    """pi_old from the generator equals the trainer's forward: with mu = 1 the ratio starts at 1."""
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    trainer = GRPOTrainer(model, tok, tiny_base.problems()[:8], GRPOConfig(group_size=4, prompts_per_step=4,
                          temperature=0.8), REWARDS, seed=3)
    ro = trainer.rollout()
    batch = build_batch(ro.prompt_ids, ro.results, trainer.pad)
    logp_BT, _ = token_logprobs(model, batch, 0.8)
    v = batch.valid_BT
    torch.testing.assert_close(logp_BT[v].detach(), batch.old_logp_BT[v], atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- the update
def reference_gradients(model, ro, cfg: GRPOConfig, ref_model, max_len: int):
    """(loss, clipped gradients) of the GRPO loss written out from its definition (full logits, no helpers)."""
    G = cfg.group_size
    per_seq, all_tok, n_valid = [], [], 0
    rewards = ro.rewards.total.view(-1, G)
    if cfg.advantage_scale == "group":
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    elif cfg.advantage_scale == "batch":
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std() + 1e-6)
    else:
        adv = rewards - rewards.mean(1, keepdim=True)
    adv = adv.reshape(-1)
    for b, r in enumerate(ro.results):
        if cfg.mask_truncated and r.finish_reason == "length":
            per_seq.append(None)
            continue
        p = ro.prompt_ids[r.prompt_index]
        ids = torch.tensor([p + r.tokens])
        span = slice(len(p) - 1, len(p) - 1 + len(r.tokens))
        tgt = torch.tensor(r.tokens)[:, None]
        logp = (model(ids)[0, span] / cfg.temperature).log_softmax(-1).gather(1, tgt).squeeze(1)
        with torch.no_grad():
            ref = (ref_model(ids)[0, span] / cfg.temperature).log_softmax(-1).gather(1, tgt).squeeze(1)
        ratio = torch.exp(logp - torch.tensor(r.logprobs))
        pg = -torch.minimum(ratio * adv[b], ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv[b])
        k3 = torch.exp(ref - logp) - (ref - logp) - 1
        tok_loss = pg + cfg.beta * k3
        per_seq.append(tok_loss.mean())
        all_tok.append(tok_loss.sum())
        n_valid += len(r.tokens)
    if cfg.aggregation == "grpo":
        seqs = [x for x in per_seq if x is not None]
        loss = torch.stack(seqs).mean()
    elif cfg.aggregation == "dr_grpo":
        loss = torch.stack(all_tok).sum() / (len(ro.results) * max_len)
    else:
        loss = torch.stack(all_tok).sum() / n_valid
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation,scale,mask", [("grpo", "group", True), ("dr_grpo", "none", False),
                                                    ("dapo", "batch", True)])
def test_update_applies_the_gradient_of_the_reference_loss(tiny_base, aggregation, scale, mask):
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, temperature=0.9, beta=0.1, eps_low=0.2, eps_high=0.28,
                     aggregation=aggregation, advantage_scale=scale, mask_truncated=mask,
                     optim={"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
                     schedule={"kind": "constant", "warmup_steps": 0})
    rewards = RewardConfig(max_completion_len=12, overlong_cache_len=4)  # some completions are truncated
    ref_model = frozen_copy(model)
    with torch.no_grad():  # a reference that differs from the policy, so that the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # A rollout with a truncated completion and a learning signal; which seed gives one depends on the CPU
    # code path's bits (seed 5 did on AVX2 dispatch, not with ATEN_CPU_CAPABILITY=default).
    for seed in range(5, 25):
        trainer = GRPOTrainer(model, tok, tiny_base.problems()[:12], cfg, rewards, seed=seed, ref_model=ref_model)
        ro = trainer.rollout()
        if any(r.finish_reason == "length" for r in ro.results) and ro.advantages_B.abs().sum() > 0:
            break
    else:
        pytest.fail("no seed in 5..24 gave a rollout with a truncated completion and a learning signal")
    # perturb pi_old so that ratios differ from 1 and both clip sides can act
    g = torch.Generator().manual_seed(0)
    for r in ro.results:
        r.logprobs = [lp + float(torch.randn(1, generator=g)) * 0.3 for lp in r.logprobs]
    want_loss, want = reference_gradients(copy.deepcopy(model), ro, cfg, ref_model, rewards.max_completion_len)
    got: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    trainer.optimizer.register_step_pre_hook(  # the gradients the optimizer is about to apply (clipped)
        lambda opt, args, kwargs: got.update({names[id(p)]: p.grad.clone() for g in opt.param_groups
                                              for p in g["params"] if p.grad is not None}))
    stats = trainer.update(ro)
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert stats["clip_fraction"] > 0 and stats["kl"] > 0
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=RTOL, msg=f"gradient of {n}")


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_update_leaves_out_groups_without_signal_and_keeps_the_gradient(tiny_base, monkeypatch, aggregation):
    """beta = 0: an all-equal group never reaches the forward, and the gradient is the full batch's."""
    import components.rl.trainer as trainer_mod

    model, tok = tiny_base.load(), tiny_base.tokenizer()
    cfg = GRPOConfig(group_size=4, prompts_per_step=3, temperature=0.9, beta=0.0, aggregation=aggregation,
                     optim={"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
                     schedule={"kind": "constant", "warmup_steps": 0})
    trainer = GRPOTrainer(model, tok, tiny_base.problems()[:12], cfg, REWARDS, seed=3)
    ro = trainer.rollout()
    ro.rewards.total[:4] = 0.0  # group 0: all wrong
    ro.rewards.total[4:8] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # group 1 has a signal
    ro.advantages_B = group_advantages(ro.rewards.total.view(3, 4), cfg.advantage_scale).reshape(-1)
    assert torch.equal(ro.advantages_B[:4], torch.zeros(4))
    seen_rows = []
    real = trainer_mod.token_logprobs

    def counting(m, batch, *args, **kwargs):
        seen_rows.append(batch.input_ids_BL.shape[0])
        return real(m, batch, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "token_logprobs", counting)
    want_loss, want = reference_gradients(copy.deepcopy(model), ro, cfg, frozen_copy(model),
                                          REWARDS.max_completion_len)
    got: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.update({names[id(p)]: p.grad.clone() for g in opt.param_groups
                                              for p in g["params"] if p.grad is not None}))
    stats = trainer.update(ro)
    assert seen_rows == [int((ro.advantages_B != 0).sum())] and seen_rows[0] <= 8
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=RTOL, msg=f"gradient of {n}")


def test_the_sampler_entropy_is_the_trainers_entropy(tiny_base):
    """The logged entropy comes from the sampler's per-token entropies (no second pass over the vocabulary);
    at mu = 1 it is the entropy the trainer's own forward gives over the same completions."""
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, temperature=0.7)
    sampler = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=3)
    ro = sampler.rollout()
    assert all(r.entropies is not None and len(r.entropies) == len(r.tokens) for r in ro.results)
    stripped = copy.deepcopy(ro)
    for r in stripped.results:
        r.entropies = None
    forward = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=3)
    assert sampler.update(ro)["entropy"] == pytest.approx(forward.update(stripped)["entropy"], rel=1e-4)


def test_mu_updates_reuse_the_rollout_with_ratios_away_from_one(tiny_base):
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    one = GRPOTrainer(model, tok, tiny_base.problems(), GRPOConfig(group_size=4, prompts_per_step=4, mu=1,
                      optim={"lr": 3e-3}), REWARDS, seed=1)
    m1 = one.update(one.rollout())
    assert m1["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m1["clip_fraction"] == 0.0
    model2 = tiny_base.load()
    two = GRPOTrainer(model2, tok, tiny_base.problems(), GRPOConfig(group_size=4, prompts_per_step=4, mu=3,
                      minibatches=2, optim={"lr": 3e-3}), REWARDS, seed=1)
    calls = []
    two.optimizer.register_step_post_hook(lambda *args: calls.append(1))
    m3 = two.update(two.rollout())
    assert len(calls) == 3 * 2  # mu passes x minibatches
    assert m3["ratio_max"] > 1.0 + 1e-3  # later passes see the updated policy against pi_old


def test_no_reference_model_is_kept_when_beta_is_zero(tiny_base):
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    trainer = GRPOTrainer(model, tok, tiny_base.problems(), GRPOConfig(group_size=2, prompts_per_step=2),
                          REWARDS, ref_model=frozen_copy(model))
    assert trainer.ref_model is None
    assert "kl" not in trainer.update(trainer.rollout())
    needs_ref = GRPOTrainer(model, tok, tiny_base.problems(), GRPOConfig(group_size=2, prompts_per_step=2,
                            beta=0.1), REWARDS)
    with pytest.raises(ValueError, match="reference model"):
        needs_ref.update(needs_ref.rollout())


# ------------------------------------------------------------------------------------ dynamic sampling
def test_dynamic_sampling_keeps_only_informative_groups_and_refills(tiny_base):
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    cfg = GRPOConfig(group_size=4, prompts_per_step=6, dynamic_sampling=True, max_sampling_rounds=4)
    trainer = GRPOTrainer(model, tok, tiny_base.problems(), cfg, REWARDS, seed=2)
    ro = trainer.rollout()
    r_PG = ro.rewards.total.view(-1, 4)
    assert len(ro.problems) <= 6 and len(ro.results) == 4 * len(ro.problems)
    assert torch.all(r_PG.amax(1) > r_PG.amin(1)), "a kept group has rewards that all agree"
    assert ro.sampled_groups == len(ro.problems) + ro.dropped_groups
    assert ro.dropped_groups == ro.degenerate_groups
    assert ro.rounds > 1 or ro.dropped_groups == 0
    assert trainer.cursor == ro.sampled_groups


def test_all_degenerate_groups_mean_no_update(tiny_base):
    """Rewards that never differ (all weights 0): every group is dropped, the weights do not move."""
    model, tok = tiny_base.load(), tiny_base.tokenizer()
    before = copy.deepcopy(model.state_dict())
    flat = RewardConfig(accuracy_weight=0, format_weight=0, overlong_weight=0, max_completion_len=16,
                        overlong_cache_len=4)
    cfg = GRPOConfig(steps=4, group_size=2, prompts_per_step=3, dynamic_sampling=True, max_sampling_rounds=2)
    trainer = GRPOTrainer(model, tok, tiny_base.problems(), cfg, flat, seed=0)
    m = trainer.train_step()
    assert m["groups/dropped"] == 6 and m["groups/kept"] == 0 and m["sampling_rounds"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------ prompts
def test_prompt_stream_is_a_seeded_sequence_of_epochs():
    s = PromptStream(10, seed=3)
    first = s.take(0, 10)
    assert sorted(first) == list(range(10))
    assert s.take(4, 9) == first[4:] + s.take(10, 3)
    assert PromptStream(10, seed=3).take(7, 20) == s.take(7, 20)
    assert PromptStream(10, seed=4).take(0, 10) != first


def test_resumed_trainer_continues_exactly(tiny_base):
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    cfg = GRPOConfig(steps=4, group_size=4, prompts_per_step=3, optim={"lr": 1e-3})
    straight = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=9)
    curve = [straight.train_step()["reward/total"] for _ in range(4)]

    first = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=9)
    for _ in range(2):
        first.train_step()
    state = copy.deepcopy(first.state_dict())
    weights, optim = copy.deepcopy(first.model.state_dict()), copy.deepcopy(first.optimizer.state_dict())
    model = tiny_base.load()
    model.load_state_dict(weights)
    resumed = GRPOTrainer(model, tok, problems, cfg, REWARDS, seed=9)
    resumed.load_state_dict(state, optim)
    rest = [resumed.train_step()["reward/total"] for _ in range(2)]
    assert [h["reward/total"] for h in resumed.history] == curve
    assert rest == curve[2:]


def test_compiled_policy_trains_like_the_eager_one(tiny_base):
    """`compile: true` compiles the policy's hidden_states (aot_eager here: the graphs inductor would get);
    rollouts stay eager. A GRPO step gives the eager loss, rewards and gradient norm."""
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    cfg = GRPOConfig(steps=4, group_size=4, prompts_per_step=3, optim={"lr": 1e-3})
    steps = []
    for compiled in (False, True):
        model = tiny_base.load()
        if compiled:
            compile_model(model, backend="aot_eager")
        steps.append(GRPOTrainer(model, tok, problems, cfg, REWARDS, seed=9).train_step())
    eager, compiled = steps
    for key in ("loss", "reward/total", "grad_norm"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------- overlapped rollouts
def _recording(trainer: GRPOTrainer) -> list:
    """The rollouts `trainer.update` is given, in order."""
    seen, update = [], trainer.update
    trainer.update = lambda ro: (seen.append(ro), update(ro))[1]
    return seen


def _tokens(ro) -> list[list[int]]:
    return [r.tokens for r in ro.results]


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_overlapped_rollouts_sample_the_same_prompts_from_the_weights_one_update_behind(tiny_base, worker):
    """With `overlap_rollout`, step t+1's groups are sampled (in a sampler process, or a background thread)
    from the weights before step t's update, with the sequential run's prompts and seeds; a sequential
    replay of that schedule gives the same samples, log-probs and final weights bit for bit (one thread on
    both sides)."""
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    cfg = GRPOConfig(steps=4, group_size=4, prompts_per_step=3, optim={"lr": 3e-3}, overlap_rollout=True,
                     rollout_worker=worker)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        over = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=5)
        seen = _recording(over)
        for _ in range(3):
            over.train_step()
        assert over._pending is not None and over._pending.done()  # step 4's, sampled from step 3's weights
        with pytest.raises(RuntimeError, match="in flight"):
            over.state_dict()

        replay = GRPOTrainer(tiny_base.load(), tok, problems, cfg.model_copy(update={"overlap_rollout": False}),
                             REWARDS, seed=5)
        start, behind = copy.deepcopy(replay.model), copy.deepcopy(replay.model)
        rollouts = [replay.rollout(step=0)]
        for t in range(1, 3):
            behind.load_state_dict(replay.model.state_dict())  # the weights before update t
            ro = replay.rollout(model=behind, step=t)  # what the background thread sampled during update t
            replay.update(rollouts[-1])
            rollouts.append(ro)
        replay.update(rollouts[-1])
        on_start = replay.rollout(model=start, step=2)
    finally:
        torch.set_num_threads(saved)
    assert len(seen) == 3 and [_tokens(a) for a in seen] == [_tokens(b) for b in rollouts]
    assert [r.logprobs for r in seen[2].results] == [r.logprobs for r in rollouts[2].results]
    # the test tells the weights apart: step 3's groups from the starting weights have other log-probs
    assert [r.logprobs for r in on_start.results] != [r.logprobs for r in rollouts[2].results]
    for name, p in replay.model.state_dict().items():
        assert torch.equal(p, over.model.state_dict()[name]), name
    process = over._sampler._proc if worker == "process" else None
    over.close()
    assert over._pending is None and over._executor is None
    if process is not None:  # closing stops the worker
        assert not process.is_alive() and process.exitcode == 0


def test_an_overlapped_run_drained_at_a_checkpoint_resumes_exactly(tiny_base):
    """`train_step(prefetch=False)` (the runner's call before a checkpoint) leaves no rollout in flight, so
    a run resumed from that checkpoint samples and trains exactly as the uninterrupted one."""
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    cfg = GRPOConfig(steps=4, group_size=4, prompts_per_step=3, optim={"lr": 1e-3}, overlap_rollout=True)
    straight = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=9)
    curve = [straight.train_step(prefetch=step != 2)["reward/total"] for step in range(1, 5)]
    straight.close()

    first = GRPOTrainer(tiny_base.load(), tok, problems, cfg, REWARDS, seed=9)
    first.train_step()
    first.train_step(prefetch=False)
    state = copy.deepcopy(first.state_dict())
    weights, optim = copy.deepcopy(first.model.state_dict()), copy.deepcopy(first.optimizer.state_dict())
    first.close()
    model = tiny_base.load()
    model.load_state_dict(weights)
    resumed = GRPOTrainer(model, tok, problems, cfg, REWARDS, seed=9)
    resumed.load_state_dict(state, optim)
    rest = [resumed.train_step()["reward/total"] for _ in range(2)]
    resumed.close()
    assert rest == curve[2:]
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, straight.model.state_dict()[name]), name


def _sampler_process(tiny_base, **kw) -> tuple[SamplerProcess, GroupSampler]:
    tok, problems = tiny_base.tokenizer(), tiny_base.problems()
    trainer = GRPOTrainer(tiny_base.load(), tok, problems, GRPOConfig(group_size=2, prompts_per_step=2), REWARDS)
    return SamplerProcess(trainer.model, trainer.sampler, threads=1, **kw), trainer.sampler


def test_the_sampler_process_samples_what_this_process_samples_with_the_weights_it_was_given(tiny_base):
    """The worker's answer equals sampling here with the same weights (bit for bit, one thread), and it
    follows `load_weights`: new weights, new log-probs."""
    proc, sampler = _sampler_process(tiny_base, timeout_s=120)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_base.load()
        here, _, rewards_here = sampler(model, [3, 7], 0, 0)
        there, texts, rewards_there = proc.sample([3, 7], 0, 0)
        assert [r.tokens for r in there] == [r.tokens for r in here]
        assert [r.logprobs for r in there] == [r.logprobs for r in here]
        assert torch.equal(rewards_there.total, rewards_here.total) and len(texts) == len(here)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        proc.load_weights(model)
        moved = proc.sample([3, 7], 0, 0)[0]
        assert [r.logprobs for r in moved] == [r.logprobs for r in sampler(model, [3, 7], 0, 0)[0]]
        assert [r.logprobs for r in moved] != [r.logprobs for r in here]
    finally:
        torch.set_num_threads(saved)
        proc.close()


def test_the_sampler_process_reports_its_errors_and_its_death(tiny_base):
    """An exception in the worker is raised in the trainer with the worker's traceback (and the worker
    serves on, as it does after a Ctrl-C); a worker that dies is a clear error, not a hang."""
    proc, _ = _sampler_process(tiny_base, timeout_s=60)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)sampling in the sampler process failed: IndexError.*traceback"):
            proc.sample([10**9], 0, 0)  # no such prompt
        assert len(proc.sample([1], 0, 0)[0]) == 2
        os.kill(proc._proc.pid, signal.SIGINT)  # a Ctrl-C reaches the process group: the trainer decides
        assert len(proc.sample([1], 0, 0)[0]) == 2
        proc._proc.kill()
        with pytest.raises(RuntimeError, match="sampler process .* exited"):
            proc.sample([1], 0, 0)
    finally:
        proc.close()


def test_a_script_without_a_main_guard_can_overlap_its_rollouts_in_a_process(tiny_base, tmp_path):
    """A user's plain script (no ``if __name__ == "__main__"``) that trains with the sampler process: spawn
    must not rerun the script in the worker (which fails at the worker's start, or repeats the script)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from components.refs.checkpoint import load_model
        from components.dataset.format import load_tokenizer
        from components.rl.config import GRPOConfig
        from components.rl.rewards import RewardConfig
        from components.rl.trainer import GRPOTrainer
        from components.tasks import make_split
        from tests.rl.conftest import RECIPE, easy_family

        print("script body ran", flush=True)
        torch.set_num_threads(2)
        model = load_model({str(tiny_base.model_dir)!r})[0]
        cfg = GRPOConfig(steps=3, group_size=2, prompts_per_step=2, overlap_rollout=True, rollout_worker="process")
        trainer = GRPOTrainer(model, load_tokenizer({str(tiny_base.model_dir)!r}),
                              make_split(easy_family(), RECIPE["n_problems"], RECIPE["seed"]), cfg,
                              RewardConfig(max_completion_len=16, overlong_cache_len=4))
        for _ in range(3):
            trainer.train_step()
        trainer.close()
        print("trained", len(trainer.history), flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["script", "body", "ran", "trained", "3"]
