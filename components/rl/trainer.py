"""The GRPO trainer: rollouts from the KV-cached generator, verified rewards, group advantages, clipped updates.

Shapes: P prompts (groups), G completions per prompt, B = P*G sequences, T completion tokens (padded),
L = longest prompt + completion, D hidden, V vocab.

One step (`GRPOTrainer.train_step`):
1. rollout: P prompts from the prompt stream, G samples each in one batched `generate` call (MLA latent
   cache; sampling at `temperature`, whose log-probs are pi_old); rewards from `components.rl.rewards`;
   advantages normalised within each group (`grpo.group_advantages`). With dynamic sampling (DAPO),
   groups whose rewards are all equal are dropped and further prompts are sampled, up to
   `max_sampling_rounds` rounds.
2. update: `mu` passes over the batch (split into `minibatches` by groups): one forward gives the policy's
   per-token log-probs at the rollout temperature (`kernels.fused_linear_cross_entropy`, no (B, T, V)
   logits with gradients), `grpo.grpo_loss` clips the ratio to pi_old and adds beta * k3 to the frozen
   reference (kept only when beta > 0); truncated completions are masked out when asked. With beta = 0
   the completions of all-equal groups (zero advantage: a quarter of the tiny preset's with the outcome
   reward alone, 5% with its steps reward) contribute nothing, so they are left out of the forward and
   backward; the loss keeps the whole minibatch's denominator (`grpo.aggregation_denominator`), so it and
   its gradient are unchanged. Entropy, clip and ratio statistics are over the completions trained on.

Rows for the policy forward are `prompt + completion`, right-padded: the model is causal, so the padding
never reaches a real token, and every prompt starts at position 0 as in evaluation. The hidden state at
position `len(prompt) + t - 1` predicts completion token t.

Overlapped rollouts (`overlap_rollout`): while step t's update runs, a background thread samples step t+1's
groups from a copy of the weights before that update (one step off-policy, as in asynchronous RL systems;
pi_old is the sampler's, so the clipped ratio corrects for the lag). The sampling runs in a process of its
own (`rollout_worker: process`, the default on CPU; `components.rl.sampler.SamplerProcess`: a shared-memory
copy of the weights, no GIL shared with the update) or in a thread with a copy in this process (`thread`);
each side runs with half the intra-op threads. The prompts and
seeds of every step are those of the sequential run; only the weights that sample them lag by one update.
`train_step(prefetch=False)` drains the pipeline (the runner asks before a checkpoint or an evaluation),
so a checkpoint never holds an in-flight rollout and a resumed run samples exactly what the first did.

The MoE routers' balancing bias is left as pretrained (no bias updates during RL); the expert counters
are reset every step.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch

import kernels
from components.common.schedule import build_scheduler
from components.model.generate import GenerationResult
from components.model.tokens import encode_prompts, token_id
from components.rl.config import GRPOConfig, SamplesConfig
from components.rl.grpo import (
    aggregation_denominator,
    filter_degenerate_groups,
    group_advantages,
    grpo_loss,
    mask_truncated,
)
from components.rl.rewards import RewardBatch, RewardConfig
from components.rl.sampler import GroupSampler, Sample, SamplerProcess, frozen_copy
from components.sft.sft import make_optimizer
from components.tasks import Problem, extract_answer
from infra.contract import TrainingDiverged

log = logging.getLogger("moeflow.rl")

IGNORE_INDEX = -100
ENTROPY_CHUNK = 2048  # tokens per chunk of the (no-grad) entropy computation
ROLLOUT_WAIT_S = 1800.0  # an overlapped rollout that takes longer than this is a hang, not a slow step


# ------------------------------------------------------------------------------------------- prompts
class PromptStream:
    """An endless, seeded stream over a prompt pool: epoch e is the pool in `Random(seed + e)`'s order.

    Stateless apart from the caller's cursor (prompts consumed so far), so a resumed run that restores the
    cursor draws exactly the prompts an uninterrupted run would.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the prompt pool is empty")
        self.n, self.seed = n, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is kept
        return self._orders[epoch]

    def take(self, cursor: int, k: int) -> list[int]:
        """Pool indices of stream positions cursor .. cursor + k - 1."""
        return [self._order(pos // self.n)[pos % self.n] for pos in range(cursor, cursor + k)]


# ------------------------------------------------------------------------------------------ batches
@dataclass
class PolicyBatch:
    """The tensors of B sequences for the policy forward (see the module docstring)."""

    input_ids_BL: torch.Tensor  # prompt + completion, right-padded
    positions_BT: torch.Tensor  # row position whose hidden state predicts completion token t
    targets_BT: torch.Tensor  # completion tokens (IGNORE_INDEX at padding)
    valid_BT: torch.Tensor  # bool: a real completion token
    old_logp_BT: torch.Tensor  # pi_old log-probs from the generator (0 at padding)
    truncated_B: torch.Tensor  # bool: cut at the length limit
    group_B: torch.Tensor  # the row's prompt (rows of one group share it)
    prompt_BP: torch.Tensor  # the row's prompt, left-padded (for the shared-prompt forward)
    prompt_valid_BP: torch.Tensor  # bool: a real prompt token

    def select(self, rows: torch.Tensor) -> PolicyBatch:
        return PolicyBatch(*(getattr(self, f.name)[rows] for f in fields(self)))


def build_batch(prompt_ids: Sequence[Sequence[int]], results: Sequence[GenerationResult], pad_id: int) -> PolicyBatch:
    """Rows `prompt + completion` for each result (``results[i].prompt_index`` names its prompt)."""
    T = max(1, max(len(r.tokens) for r in results))
    L = max(len(prompt_ids[r.prompt_index]) + len(r.tokens) for r in results)
    P = max(len(prompt_ids[r.prompt_index]) for r in results)
    # padded Python rows, one tensor each: per-row tensor writes cost more than the update's loss (profiled)
    prompts = [list(prompt_ids[r.prompt_index]) for r in results]
    ns = [len(r.tokens) for r in results]
    input_ids = torch.tensor([p + r.tokens + [pad_id] * (L - len(p) - n)
                              for p, r, n in zip(prompts, results, ns, strict=True)], dtype=torch.long)
    positions = torch.tensor([list(range(len(p) - 1, len(p) - 1 + n)) + [0] * (T - n)
                              for p, n in zip(prompts, ns, strict=True)], dtype=torch.long)
    targets = torch.tensor([r.tokens + [IGNORE_INDEX] * (T - n) for r, n in zip(results, ns, strict=True)],
                           dtype=torch.long)
    old_logp = torch.tensor([r.logprobs + [0.0] * (T - n) for r, n in zip(results, ns, strict=True)],
                            dtype=torch.float32)
    prompt = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], dtype=torch.long)
    prompt_valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], dtype=torch.bool)
    truncated = torch.tensor([r.finish_reason == "length" for r in results], dtype=torch.bool)
    group = torch.tensor([r.prompt_index for r in results], dtype=torch.long)
    return PolicyBatch(input_ids, positions, targets, targets != IGNORE_INDEX, old_logp, truncated, group, prompt,
                       prompt_valid)


def _shared_prompt_hidden(model: torch.nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """The hidden states that predict the completion tokens, (B, T, D), with every prompt run once.

    The distinct prompts go through the model as one left-padded batch, filling its KV cache (MLA's latents,
    GQA's keys and values) with gradients attached; each row then runs its completion against its prompt's
    cache rows (`cache.select`, whose backward sums the G rows' gradients into the shared prompt). This is
    the computation `generate` does, with gradients: the same log-probs as one forward per `prompt +
    completion` row up to float rounding (RoPE is relative, so the left padding moves no score), and the
    G - 1 repeats of every prompt leave the trunk (on the tiny preset ~45% of its tokens).
    """
    B, T = batch.targets_BT.shape
    W = model.output_weight()
    uniq, inv_B = torch.unique(batch.group_B, return_inverse=True)
    first_U = torch.full((uniq.numel(),), B, dtype=torch.long).scatter_reduce(
        0, inv_B, torch.arange(B), reduce="amin")
    valid_UP = batch.prompt_valid_BP[first_U]
    P = int(valid_UP.sum(1).max())
    prompt_UP, valid_UP = batch.prompt_BP[first_U, -P:].to(W.device), valid_UP[:, -P:].to(W.device)
    inv_B = inv_B.to(W.device)
    cache = model.allocate_cache(uniq.numel(), P + T - 1, dtype=W.dtype, device=W.device)
    cache.valid[:, :P] = valid_UP
    h_B1D = model.hidden_states_cached(prompt_UP, cache)[:, -1:].index_select(0, inv_B)
    if T == 1:
        return h_B1D
    cache = cache.select(inv_B)
    cache.valid[:, P:] = True  # a completion's padding comes after its tokens: causal, it reaches none
    completion_BT = torch.where(batch.valid_BT, batch.targets_BT, 0)[:, :-1].to(W.device)
    return torch.cat([h_B1D, model.hidden_states_cached(completion_BT, cache)], dim=1)


def token_logprobs(model: torch.nn.Module, batch: PolicyBatch, temperature: float, *,
                   with_entropy: bool = False, shared_prompts: bool = False) -> tuple[torch.Tensor, float | None]:
    """(log pi(token) at `temperature` (B, T) fp32, 0 at padding; differentiable, and the token-mean
    entropy of the policy over the valid tokens (no gradient) when `with_entropy`).

    shared_prompts: run each distinct prompt once and the completions against its KV cache
    (`_shared_prompt_hidden`) instead of one forward per `prompt + completion` row."""
    B, T = batch.targets_BT.shape
    if shared_prompts:
        h_BTD = _shared_prompt_hidden(model, batch)
    else:
        h_BLD = model.hidden_states(batch.input_ids_BL)
        h_BTD = h_BLD.gather(1, batch.positions_BT.unsqueeze(-1).expand(B, T, h_BLD.shape[-1]))
    D = h_BTD.shape[-1]
    W_VD = model.output_weight()
    # the output layer over the real tokens only: a group's completions differ in length, and the padding
    # (~15% of the rows on the tiny preset) would otherwise go through the vocabulary GEMMs and softmax
    idx_N = batch.valid_BT.reshape(-1).nonzero().squeeze(1).to(h_BTD.device)
    ce_N = kernels.fused_linear_cross_entropy(h_BTD.reshape(-1, D).index_select(0, idx_N), W_VD,
                                              batch.targets_BT.reshape(-1).to(h_BTD.device).index_select(0, idx_N),
                                              reduction="none", temperature=temperature)
    logp_BT = h_BTD.new_zeros(B * T, dtype=ce_N.dtype).index_copy(0, idx_N, -ce_N).view(B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            h_ND = h_BTD[batch.valid_BT].detach()
            total = 0.0
            for s in range(0, h_ND.shape[0], ENTROPY_CHUNK):
                z_nV = (h_ND[s : s + ENTROPY_CHUNK] @ W_VD.detach().T).float() / temperature
                logp_nV = z_nV.log_softmax(-1)
                total += float(-(logp_nV.exp() * logp_nV).sum())
            entropy = total / max(h_ND.shape[0], 1)
    return logp_BT, entropy


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class Rollout:
    """One step's kept groups: P problems, their B = P*G completions (prompt-major), rewards, advantages."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    results: list[GenerationResult]
    texts: list[str]
    rewards: RewardBatch
    advantages_B: torch.Tensor
    sampled_groups: int  # groups generated over all rounds
    dropped_groups: int  # of those, dropped by dynamic sampling
    degenerate_groups: int  # of those, all-equal rewards (dropped or not)
    rounds: int
    generated_tokens: int


def _concat_rewards(parts: list[RewardBatch]) -> RewardBatch:
    if len(parts) == 1:
        return parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return RewardBatch(accuracy=cat("accuracy"), format=cat("format"), overlong=cat("overlong"), steps=cat("steps"),
                       total=cat("total"), verify=[v for p in parts for v in p.verify],
                       n_timeout=sum(p.n_timeout for p in parts), n_error=sum(p.n_error for p in parts),
                       n_no_answer=sum(p.n_no_answer for p in parts))


def _select_rewards(rb: RewardBatch, rows: list[int]) -> RewardBatch:
    idx = torch.tensor(rows, dtype=torch.long)
    verify = [rb.verify[i] for i in rows]
    return RewardBatch(accuracy=rb.accuracy[idx], format=rb.format[idx], overlong=rb.overlong[idx], steps=rb.steps[idx],
                       total=rb.total[idx], verify=verify, n_timeout=sum(v.status == "timeout" for v in verify),
                       n_error=sum(v.status == "error" for v in verify),
                       n_no_answer=sum(v.status == "no_answer" for v in verify))


# ------------------------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """GRPO on `model` (in place) over a pool of verifiable problems. See the module docstring.

    ref_model: the frozen reference of the KL term (or `set_reference` later); needed, and only kept, when
    ``cfg.beta > 0``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem], cfg: GRPOConfig,
                 rewards: RewardConfig, *, seed: int = 0, ref_model: torch.nn.Module | None = None,
                 samples: SamplesConfig | None = None, log_fn: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.cfg, self.reward_cfg = model, tokenizer, cfg, rewards
        self.problems = list(problems)
        self.ref_model: torch.nn.Module | None = None
        if ref_model is not None:
            self.set_reference(ref_model)
        self.seed = seed
        self.samples_cfg = samples or SamplesConfig()
        self.log_fn = log_fn
        mcfg = model.cfg
        self.bos = mcfg.bos_token_id
        self.pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_ids or [0])[0]
        stop = token_id(tokenizer, "</answer>")
        self.stop_ids = [] if stop is None else [stop]
        self.prompt_ids = encode_prompts(tokenizer, [p.prompt for p in self.problems], self.bos)
        self.sampler = GroupSampler(tokenizer, self.problems, self.prompt_ids, cfg, self.stop_ids, seed, rewards)
        self.stream = PromptStream(len(self.problems), seed)
        self.optimizer = make_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.schedule)
        self.step = 0
        self.cursor = 0
        self.history: list[dict[str, float]] = []
        self.sample_rows: list[dict[str, Any]] = []
        # overlap_rollout: the weights the next rollout samples (a copy here, or a sampler process's)
        self._sampler: torch.nn.Module | SamplerProcess | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Rollout] | None = None

    def set_reference(self, ref_model: torch.nn.Module) -> None:
        """The frozen reference of the KL term (kept only when beta > 0)."""
        if self.cfg.beta == 0:
            return
        self.ref_model = ref_model.eval()
        for p in self.ref_model.parameters():
            p.requires_grad_(False)

    # --- rollouts -----------------------------------------------------------------------------------
    def _sample(self, model: torch.nn.Module | SamplerProcess, idx: list[int], step: int, round_: int) -> Sample:
        if isinstance(model, SamplerProcess):
            return model.sample(idx, step, round_)
        return self.sampler(model, idx, step, round_)

    def rollout(self, model: torch.nn.Module | SamplerProcess | None = None, step: int | None = None) -> Rollout:
        """Sample the groups of the step after `step` (default: the steps done) with `model` (default the
        policy); dynamic sampling refills dropped groups. Advances the prompt cursor."""
        cfg, G = self.cfg, self.cfg.group_size
        model = self.model if model is None else model
        step = self.step if step is None else step
        kept_idx: list[int] = []
        kept_results: list[GenerationResult] = []
        kept_texts: list[str] = []
        kept_rewards: list[RewardBatch] = []
        sampled = dropped = degenerate = tokens = rounds = 0
        need = cfg.prompts_per_step
        while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            idx = self.stream.take(self.cursor, need)
            self.cursor += need
            results, texts, rewards = self._sample(model, idx, step, rounds)
            rounds += 1
            sampled += len(idx)
            tokens += sum(len(r.tokens) for r in results)
            informative = filter_degenerate_groups(rewards.total.view(len(idx), G))
            degenerate += int((~informative).sum())
            keep = list(range(len(idx)))
            if cfg.dynamic_sampling:
                keep = [p for p in keep if bool(informative[p])][:need]
                dropped += len(idx) - len(keep)
            rows = [p * G + g for p in keep for g in range(G)]
            for p in keep:
                kept_idx.append(idx[p])
                for g in range(G):
                    r = results[p * G + g]
                    kept_results.append(GenerationResult(
                        tokens=r.tokens, logprobs=r.logprobs, finish_reason=r.finish_reason,
                        prompt_index=len(kept_idx) - 1, sample_index=g, stop=r.stop, entropies=r.entropies))
                    kept_texts.append(texts[p * G + g])
            if rows:
                kept_rewards.append(_select_rewards(rewards, rows))
            need -= len(keep)
        if not kept_idx:  # every group was degenerate in every round: nothing to learn from this step
            return Rollout([], [], [], [], _concat_rewards([rewards]), torch.zeros(0), sampled, dropped,
                           degenerate, rounds, tokens)
        reward_batch = _concat_rewards(kept_rewards)
        adv_PG = group_advantages(reward_batch.total.view(len(kept_idx), G), cfg.advantage_scale)
        return Rollout(problems=[self.problems[i] for i in kept_idx],
                       prompt_ids=[self.prompt_ids[i] for i in kept_idx], results=kept_results,
                       texts=kept_texts, rewards=reward_batch, advantages_B=adv_PG.reshape(-1),
                       sampled_groups=sampled, dropped_groups=dropped, degenerate_groups=degenerate,
                       rounds=rounds, generated_tokens=tokens)

    # --- updates ------------------------------------------------------------------------------------
    def update(self, ro: Rollout) -> dict[str, float]:
        """`mu` passes of clipped policy-gradient updates over the rollout (minibatches of whole groups)."""
        cfg, G = self.cfg, self.cfg.group_size
        if cfg.beta > 0 and self.ref_model is None:
            raise ValueError("beta > 0 needs a reference model: call set_reference (e.g. a frozen copy of the "
                             "initial policy)")
        batch = build_batch(ro.prompt_ids, ro.results, self.pad)
        loss_mask_BT = batch.valid_BT
        if cfg.mask_truncated:
            loss_mask_BT = mask_truncated(loss_mask_BT, batch.truncated_B)
        P = len(ro.problems)
        groups = torch.arange(P)
        chunks = [c for c in torch.tensor_split(groups, min(cfg.minibatches, P)) if len(c)]
        # rows that move the loss: all of them with a KL term, else those with a non-zero advantage
        signal_B = ro.advantages_B != 0
        if self.ref_model is not None:
            signal_B = torch.ones_like(signal_B)
        self.model.train()
        stats: list[dict[str, float]] = []
        entropy_sum, entropy_n = 0.0, 0
        # the policy's entropy: the sampler's, per token (the same distribution at mu = 1 without overlap,
        # the weights one update behind with it), else a pass over the vocabulary in the first epoch
        sampler_entropy = all(r.entropies is not None for r in ro.results)
        grad_norms: list[float] = []
        for epoch in range(cfg.mu):
            for chunk in chunks:
                all_rows = (chunk[:, None] * G + torch.arange(G)[None, :]).reshape(-1)
                denominator = aggregation_denominator(loss_mask_BT[all_rows], cfg.aggregation,
                                                      self.reward_cfg.max_completion_len)
                rows = all_rows[signal_B[all_rows]]
                if rows.numel() == 0:  # every group of the minibatch all-equal: nothing to learn from
                    continue
                mb = batch.select(rows)
                logp_BT, entropy = token_logprobs(self.model, mb, cfg.temperature,
                                                 with_entropy=epoch == 0 and not sampler_entropy,
                                                 shared_prompts=cfg.shared_prompts)
                if epoch == 0 and sampler_entropy:
                    ents = [e for b in rows.tolist() for e in ro.results[b].entropies]
                    entropy_sum, entropy_n = entropy_sum + sum(ents), entropy_n + len(ents)
                if entropy is not None:
                    n_valid = int(mb.valid_BT.sum())
                    entropy_sum, entropy_n = entropy_sum + entropy * n_valid, entropy_n + n_valid
                ref_logp_BT = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_logp_BT, _ = token_logprobs(self.ref_model, mb, cfg.temperature,
                                                        shared_prompts=cfg.shared_prompts)
                loss, st = grpo_loss(logp_BT, mb.old_logp_BT, ro.advantages_B[rows], loss_mask_BT[rows],
                                     ref_logp=ref_logp_BT, beta=cfg.beta, eps_low=cfg.eps_low,
                                     eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                                     max_len=self.reward_cfg.max_completion_len, denominator=denominator)
                if epoch == 0:  # generator vs. trainer log-probs of the same policy (numerics only when mu=1)
                    with torch.no_grad():
                        d_BT = (mb.old_logp_BT - logp_BT.detach())
                        v = mb.valid_BT
                        st["kl_sampler"] = float(((d_BT.exp() - d_BT - 1) * v).sum() / v.sum().clamp(min=1))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"non-finite GRPO loss {float(loss)} at step {self.step + 1}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                if not torch.isfinite(gnorm):
                    raise TrainingDiverged(f"non-finite gradient norm at step {self.step + 1}")
                self.optimizer.step()
                grad_norms.append(float(gnorm))
                stats.append({"loss": float(loss.detach()), **st})
        self.scheduler.step()
        if hasattr(self.model, "reset_expert_counts"):
            self.model.reset_expert_counts()
        if not stats:
            return {}
        out = {k: sum(s[k] for s in stats if k in s) / sum(1 for s in stats if k in s)
               for k in sorted({k for s in stats for k in s})}
        out["n_tokens"] = float(sum(s["n_tokens"] for s in stats[: len(stats) // cfg.mu]))
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        if entropy_n:
            out["entropy"] = entropy_sum / entropy_n
        return out

    # --- one step -----------------------------------------------------------------------------------
    def train_step(self, prefetch: bool = True) -> dict[str, float]:
        """Rollout + update; returns the step's metrics (also appended to `history`).

        With `overlap_rollout`, the next step's rollout runs in the background during this step's update
        unless `prefetch` is false or this is the last step (see the module doc)."""
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        ro = self._take_pending() if self._pending is not None else self.rollout()
        t_roll = time.perf_counter() - t0
        self.step += 1
        m: dict[str, float] = rollout_metrics(ro, self.cfg.group_size)
        overlap = self.cfg.overlap_rollout and prefetch and self.step < self.cfg.steps
        threads = torch.get_num_threads()
        if overlap:
            torch.set_num_threads(max(1, threads // 2))
            self._start_rollout()
        try:
            if ro.problems:
                upd = self.update(ro)
            else:  # nothing to learn from: no update, but the schedule follows the steps
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                    self.scheduler.step()
                upd = {}
            if overlap:  # the update's share of the step: the rest is the wait for the rollout, next step
                m["time/update_s"] = time.perf_counter() - t0 - t_roll
                self._pending_ready()
        finally:
            torch.set_num_threads(threads)
        m.update({
            "loss": upd.get("loss", 0.0), "pg_loss": upd.get("pg_loss", 0.0),
            "clip_fraction": upd.get("clip_fraction", 0.0), "clip_low_fraction": upd.get("clip_low_fraction", 0.0),
            "clip_high_fraction": upd.get("clip_high_fraction", 0.0), "ratio_mean": upd.get("ratio_mean", 1.0),
            "ratio_max": upd.get("ratio_max", 1.0), "grad_norm": upd.get("grad_norm", 0.0), "lr": lr,
            "kl_sampler": upd.get("kl_sampler", 0.0), "loss_tokens": upd.get("n_tokens", 0.0),
        })
        if "entropy" in upd:
            m["entropy"] = upd["entropy"]
        if "kl" in upd:
            m["kl"] = upd["kl"]
        m["time/rollout_s"] = t_roll
        m["time/step_s"] = time.perf_counter() - t0
        m["step"] = float(self.step)
        self.history.append(m)
        if self.step % self.samples_cfg.every == 0 or self.step == self.cfg.steps or self.step == 1:
            self.sample_rows.extend(sample_table(ro, self.step, self.samples_cfg.n, self.cfg.group_size))
        return m

    # --- overlapped rollouts ------------------------------------------------------------------------
    def _start_rollout(self) -> None:
        """Sample the next step's groups in the background from a copy of the current (pre-update) weights:
        in a thread, with a copy in this process, or through a sampler process (`rollout_worker`)."""
        if self._sampler is None:
            worker = self.cfg.rollout_worker
            if worker == "auto":
                worker = "process" if all(p.device.type == "cpu" for p in self.model.parameters()) else "thread"
            if worker == "process":
                self._sampler = SamplerProcess(self.model, self.sampler, torch.get_num_threads(), ROLLOUT_WAIT_S)
            else:
                self._sampler = frozen_copy(self.model)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="moeflow-rollout")
        elif isinstance(self._sampler, SamplerProcess):
            self._sampler.load_weights(self.model)
        else:
            self._sampler.load_state_dict(self.model.state_dict())
        assert self._executor is not None
        self._pending = self._executor.submit(self.rollout, self._sampler, self.step)

    def _pending_ready(self) -> None:
        """Wait (bounded) for the background rollout, so the step's time includes it and errors surface."""
        assert self._pending is not None
        try:
            self._pending.result(timeout=ROLLOUT_WAIT_S)
        except TimeoutError as e:
            raise RuntimeError(f"the overlapped rollout of step {self.step + 1} did not finish within "
                               f"{ROLLOUT_WAIT_S:.0f} s") from e

    def _take_pending(self) -> Rollout:
        assert self._pending is not None
        fut, self._pending = self._pending, None
        return fut.result(timeout=ROLLOUT_WAIT_S)

    def close(self) -> None:
        """Drop the background rollout machinery (the sampler copy, its thread); a pending rollout is
        finished and discarded, its prompts stay consumed."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if isinstance(self._sampler, SamplerProcess):
            self._sampler.close()
        self._executor, self._sampler, self._pending = None, None, None

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights and optimizer state, as weights_only-loadable data."""
        if self._pending is not None:
            raise RuntimeError("a rollout is in flight: checkpoint after a train_step(prefetch=False)")
        return {"step": self.step, "cursor": self.cursor, "scheduler": self.scheduler.state_dict(),
                "history": self.history, "sample_rows": self.sample_rows}

    def load_state_dict(self, state: dict[str, Any], optimizer: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.cursor = int(state["step"]), int(state["cursor"])
        self.history = list(state["history"])
        self.sample_rows = list(state["sample_rows"])


# ------------------------------------------------------------------------------------------ metrics
def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return 0.0, 0.0
    return float(x.mean()), float(x.std(unbiased=False))


def rollout_metrics(ro: Rollout, G: int) -> dict[str, float]:
    """Reward mean/std per component, accuracy, response length, truncation, groups dropped."""
    rb = ro.rewards
    m: dict[str, float] = {}
    for name in ("total", "accuracy", "format", "overlong", "steps"):
        mean, std = _mean_std(getattr(rb, name))
        m[f"reward/{name}"], m[f"reward/{name}_std"] = mean, std
    m["accuracy"] = m["reward/accuracy"]
    lengths = torch.tensor([len(r.tokens) for r in ro.results], dtype=torch.float32)
    m["response_length"], m["response_length_std"] = _mean_std(lengths)
    m["response_length_max"] = float(lengths.max()) if lengths.numel() else 0.0
    m["truncated_fraction"] = (sum(r.finish_reason == "length" for r in ro.results) / len(ro.results)
                               if ro.results else 0.0)
    m["groups/kept"] = float(len(ro.problems))
    m["groups/dropped"] = float(ro.dropped_groups)
    m["groups/degenerate_fraction"] = ro.degenerate_groups / max(ro.sampled_groups, 1)
    m["sampling_rounds"] = float(ro.rounds)
    m["generated_tokens"] = float(ro.generated_tokens)
    m["verifier/timeouts"] = float(rb.n_timeout)
    m["verifier/errors"] = float(rb.n_error)
    m["verifier/no_answer"] = float(rb.n_no_answer)
    return m


def sample_table(ro: Rollout, step: int, n: int, G: int) -> list[dict[str, Any]]:
    """The first completion of each of the first `n` groups, as table rows."""
    rows = []
    for p in range(min(n, len(ro.problems))):
        b = p * G
        text = ro.texts[b]
        rows.append({"step": step, "question": ro.problems[p].question, "reference": ro.problems[p].answer,
                     "completion": text, "answer": extract_answer(text) or "",
                     "correct": bool(ro.rewards.accuracy[b] > 0), "reward": round(float(ro.rewards.total[b]), 4),
                     "tokens": len(ro.results[b].tokens), "finish": ro.results[b].finish_reason})
    return rows
