"""Supervised fine-tuning on prompt/completion pairs, with optional logit distillation from a teacher.

Used by R1's cold start (RL), by student SFT on rejection-sampled traces and by logit distillation.

Examples become token sequences ``[bos] prompt completion [eos]`` (exactly the form of a task document
in pretraining rows), with the loss on the completion and its eos only. Sequences are **packed** several
to a row of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``), first-fit in a seeded
shuffled order, never split across rows; the rest of a row is padding with label -100.

Attention inside a packed row: the model is plain causal over the whole row (it takes no attention mask
or position ids), so a sequence can attend to the examples packed before it in the same row and its
positions continue from theirs. This is the situation the model was pretrained in (prep packs documents
back to back, each opening with ``<|bos|>``), the loss never falls on prompt or padding tokens, and
evaluation always sees a single example from position 0; we accept it for the 2-4x fewer padded tokens.
A sequence longer than a row is truncated to ``seq_len + 1`` tokens (counted in ``truncated``).

Logit distillation (teacher given, same vocabulary): on an off-policy batch (the examples) the loss is
``(1 - kd_weight) * CE + kd_weight * D(teacher || student)`` over the completion tokens; with probability
``on_policy_fraction`` (lambda, drawn per step from a seeded generator) a batch instead holds student
samples for the examples' prompts and the loss is ``D`` alone over the sampled tokens (GKD,
Agarwal et al. 2024). ``D`` is ``kernels.fused_linear_distill_loss``: chunked over tokens, so the full
vocabulary logits of the two models are never held at once.

Optimisation: AdamW (decoupled weight decay on matrices only) and the learning-rate schedules of
pretraining (``components.common.schedule``), gradient clipping. MoE students get their aux-loss-free
bias update every step.
Resume: ``checkpoint(step, state)`` is called every ``ckpt_every`` steps and at the end with
``training_state()``; pass that dict back as ``resume`` to continue bit-for-bit on the same data order.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import kernels
from components.common.config import OptimConfig, ScheduleConfig
from components.common.schedule import build_scheduler
from components.common.system import eta
from components.model.tokens import encode_texts, special_ids
from infra.contract import TrainingDiverged

IGNORE_INDEX = -100


class SFTConfig(BaseModel):
    """Optimisation and packing of supervised fine-tuning (also the base of distillation)."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(256, gt=1, description="tokens of model input per packed row")
    batch_size: int = Field(16, gt=0, description="packed rows per optimizer step")
    epochs: float = Field(1.0, gt=0, description="passes over the examples (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; null = derived from epochs")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3),
                               description="AdamW (pretraining's optimizer config)")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(warmup_steps=10),
                                     description="learning-rate schedule (pretraining's)")
    seed: int = Field(0, description="seed of the example order, packing and on-policy draws")
    log_every: int = Field(10, gt=0, description="steps between logged metrics")
    ckpt_every: int = Field(0, ge=0, description="steps between checkpoint() calls (0 = only at the end)")
    mix_rows_per_batch: int = Field(
        0, ge=0, description="rows of plain text (e.g. the pretraining corpus) added to every batch, trained on "
        "all their tokens (with the teacher: distilled on all of them)")


class DistillLossConfig(BaseModel):
    """Logit distillation from a teacher that shares the student's tokenizer."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="divergence: KL(t||s), KL(s||t), or generalised JSD with beta")
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (0 = forward KL, 1 = reverse KL)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models in the loss")
    kd_weight: float = Field(0.5, ge=0, le=1, description="weight of the divergence against CE (off-policy)")
    on_policy_fraction: float = Field(
        0.0, ge=0, le=1, description="lambda: probability that a step trains on student samples")
    on_policy_prompts: int = Field(32, gt=0, description="prompts sampled by the student per on-policy step")
    on_policy_max_new_tokens: int = Field(64, gt=0, description="length limit of on-policy samples")
    on_policy_temperature: float = Field(1.0, ge=0, description="sampling temperature of on-policy samples")
    chunk_size: int | None = Field(None, gt=0, description="tokens per chunk in the fused loss (null = auto)")

    @model_validator(mode="after")
    def _check(self) -> DistillLossConfig:
        if self.kd_weight == 0 and self.on_policy_fraction > 0:
            raise ValueError("on_policy_fraction > 0 needs kd_weight > 0 (on-policy steps train on the "
                             "divergence alone); raise kd_weight or set on_policy_fraction to 0")
        return self


# ---------------------------------------------------------------------------------------- tokenizing
@dataclass
class Sequenced:
    """One example as tokens: ``tokens[i + 1]`` is trained on iff ``train_mask[i + 1]``."""

    tokens: list[int]
    train_mask: list[bool]


def tokenize_examples(tokenizer: Any, examples: Sequence[dict[str, str]], *, bos_id: int | None,
                      eos_id: int | None) -> list[Sequenced]:
    """``[bos] prompt completion [eos]`` with the completion and eos marked for training."""
    for i, ex in enumerate(examples):
        if not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("completion"), str):
            raise ValueError(f"example {i}: needs string fields 'prompt' and 'completion', got {sorted(ex)}")
    prompts = encode_texts(tokenizer, [ex["prompt"] for ex in examples])
    completions = encode_texts(tokenizer, [ex["completion"] for ex in examples])
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ptoks, ctoks = head + p, c + tail
        out.append(Sequenced(ptoks + ctoks, [False] * len(ptoks) + [True] * len(ctoks)))
    return out


# -------------------------------------------------------------------------------------------- packing
@dataclass
class PackedRows:
    """``inputs``/``labels`` (R, S) int64; ``labels`` is -100 on prompts, padding and across boundaries."""

    inputs: torch.Tensor
    labels: torch.Tensor
    n_sequences: int
    truncated: int
    used: int  # row slots holding example tokens

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def fill(self) -> float:
        """Fraction of row slots holding example tokens (not padding)."""
        return self.used / max(1, self.inputs.numel() + self.inputs.shape[0])


def pack_sequences(seqs: Sequence[Sequenced], seq_len: int, *, pad_id: int, order: Sequence[int] | None = None,
                   lookback: int = 64) -> PackedRows:
    """First-fit packing (over the last ``lookback`` open rows) of whole sequences into rows of
    ``seq_len + 1`` tokens, in ``order`` (default: as given)."""
    row_len = seq_len + 1
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    truncated = 0
    for i in order if order is not None else range(len(seqs)):
        toks, mask = seqs[i].tokens, seqs[i].train_mask
        if len(toks) > row_len:
            toks, mask, truncated = toks[:row_len], mask[:row_len], truncated + 1
        for r in range(max(0, len(rows) - lookback), len(rows)):
            if len(rows[r]) + len(toks) <= row_len:
                rows[r].extend(toks)
                masks[r].extend(mask)
                break
        else:
            rows.append(list(toks))
            masks.append(list(mask))
    used = sum(len(r) for r in rows)
    R = len(rows)
    full = torch.full((R, row_len), pad_id, dtype=torch.long)
    train = torch.zeros((R, row_len), dtype=torch.bool)
    for r, (toks, mask) in enumerate(zip(rows, masks, strict=True)):
        full[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        train[r, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    labels = full[:, 1:].masked_fill(~train[:, 1:], IGNORE_INDEX)
    return PackedRows(full[:, :-1].contiguous(), labels.contiguous(), len(seqs) if order is None else len(order),
                      truncated, used)


def epoch_rows(seqs: Sequence[Sequenced], seq_len: int, *, pad_id: int, seed: int, epoch: int) -> PackedRows:
    """The packed rows of one epoch: examples shuffled with (seed, epoch), packed, rows shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    packed = pack_sequences(seqs, seq_len, pad_id=pad_id, order=order)
    perm = list(range(packed.inputs.shape[0]))
    rng.shuffle(perm)
    idx = torch.tensor(perm, dtype=torch.long)
    packed.inputs, packed.labels = packed.inputs[idx], packed.labels[idx]
    return packed


def batches(seqs: Sequence[Sequenced], cfg: SFTConfig, *, pad_id: int, mix_rows: torch.Tensor | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, labels) batches of ``cfg.batch_size`` packed example rows, epoch after epoch (last
    partial batch of an epoch included), each followed by ``cfg.mix_rows_per_batch`` rows of ``mix_rows``
    (a seeded permutation, cycled) trained on every token."""
    k = cfg.mix_rows_per_batch
    if k:
        if mix_rows is None or mix_rows.dim() != 2 or mix_rows.shape[1] != cfg.seq_len + 1 or not len(mix_rows):
            raise ValueError(f"mix_rows_per_batch = {k} needs mix_rows of shape (N >= 1, seq_len + 1 = "
                             f"{cfg.seq_len + 1}), got {None if mix_rows is None else tuple(mix_rows.shape)}")
        perm = torch.randperm(len(mix_rows), generator=torch.Generator().manual_seed(cfg.seed + 104729))
    epoch, b = 0, 0
    while True:
        packed = epoch_rows(seqs, cfg.seq_len, pad_id=pad_id, seed=cfg.seed, epoch=epoch)
        for s in range(0, packed.inputs.shape[0], cfg.batch_size):
            inputs, labels = packed.inputs[s : s + cfg.batch_size], packed.labels[s : s + cfg.batch_size]
            if k:
                rows = mix_rows[perm[torch.arange(b * k, (b + 1) * k) % len(mix_rows)]]
                inputs = torch.cat([inputs, rows[:, :-1]])
                labels = torch.cat([labels, rows[:, 1:]])
            b += 1
            yield inputs, labels
        epoch += 1


# ----------------------------------------------------------------------------------------- optimizer
def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) and none on norms, biases and router bias buffers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def total_steps(n_rows: int, cfg: SFTConfig) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))


# -------------------------------------------------------------------------------------------- losses
def _kd_loss(model, teacher, inputs, labels, dcfg: DistillLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (divergence over the trained tokens, the student's hidden states (B, T, D))."""
    h_s = model.hidden_states(inputs)
    with torch.no_grad():
        h_t = teacher.hidden_states(inputs)
    mask = (labels != IGNORE_INDEX).reshape(-1)
    return kernels.fused_linear_distill_loss(
        h_s.reshape(-1, h_s.shape[-1]), model.output_weight(), h_t.reshape(-1, h_t.shape[-1]),
        teacher.output_weight().detach(), mask=mask, kind=dcfg.kind, beta=dcfg.beta,
        temperature=dcfg.temperature, chunk_size=dcfg.chunk_size), h_s


def offpolicy_loss(model, inputs, labels, *, teacher=None, dcfg: DistillLossConfig | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the completion tokens, mixed with the divergence to the teacher when one is given."""
    if teacher is None or dcfg is None or dcfg.kd_weight == 0:
        out = model.compute_loss(inputs, labels)
        return out.loss, {"ce": float(out.lm_loss.detach())}
    kd, h_s = _kd_loss(model, teacher, inputs, labels, dcfg)
    ce_sum = kernels.fused_linear_cross_entropy(
        h_s.reshape(-1, h_s.shape[-1]), model.output_weight(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    ce = ce_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
    loss = (1 - dcfg.kd_weight) * ce + dcfg.kd_weight * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}


def student_samples(model, tokenizer, prompts: Sequence[str], dcfg: DistillLossConfig, *, seq_len: int,
                    bos_id: int | None, eos_id: int | None, pad_id: int, seed: int) -> PackedRows:
    """On-policy batch: the student samples a completion per prompt; packed with the sampled tokens
    (including a stop token) marked for training."""
    from components.model.generate import generate

    head = [] if bos_id is None else [bos_id]
    ptoks = [head + p for p in encode_texts(tokenizer, prompts)]
    room = max(1, min(dcfg.on_policy_max_new_tokens, seq_len + 1 - max(len(p) for p in ptoks)))
    results = generate(model, ptoks, max_new_tokens=room, temperature=dcfg.on_policy_temperature,
                       seed=seed, eos_token_id=eos_id if eos_id is not None else None)
    seqs = [Sequenced(p + r.tokens, [False] * len(p) + [True] * len(r.tokens))
            for p, r in zip(ptoks, results, strict=True)]
    return pack_sequences(seqs, seq_len, pad_id=pad_id)


# ---------------------------------------------------------------------------------------- the loop
def sft_train(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    cfg: SFTConfig,
    *,
    tracker: Any = None,
    teacher: torch.nn.Module | None = None,
    distill_cfg: DistillLossConfig | None = None,
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    mix_rows: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on ``examples`` (dicts with ``prompt`` and ``completion``).

    teacher + distill_cfg: logit distillation (see the module docstring); the teacher is put in eval mode
    and never updated. checkpoint(step, state) is called every ``cfg.ckpt_every`` steps and after the last
    one; ``resume`` is such a state. mix_rows (N, seq_len + 1) int64: token rows mixed into every batch
    (``cfg.mix_rows_per_batch``; steps still count example epochs). Returns the run's metrics (final loss,
    tokens, packing, timing).
    """
    if not examples:
        raise ValueError("sft_train needs at least one example")
    if teacher is not None:
        if teacher.output_weight().shape[0] != model.output_weight().shape[0]:
            raise ValueError("teacher and student vocabularies differ; logit distillation needs a shared "
                             "tokenizer (train on the teacher's traces with SFT only)")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    dcfg = distill_cfg if teacher is not None else None
    bos, eos, pad = special_ids(model)
    seqs = tokenize_examples(tokenizer, examples, bos_id=bos, eos_id=eos)
    first = epoch_rows(seqs, cfg.seq_len, pad_id=pad, seed=cfg.seed, epoch=0)
    steps = total_steps(first.inputs.shape[0], cfg)
    prompts = [ex["prompt"] for ex in examples]

    opt = make_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, steps, cfg.schedule)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = int(resume["step"])
    data = batches(seqs, cfg, pad_id=pad, mix_rows=mix_rows)
    for _ in range(start):  # same data order as an uninterrupted run
        next(data)
    op_rng = random.Random(cfg.seed + 7919)
    for _ in range(start):
        op_rng.random()

    is_moe = bool(getattr(model, "moe_layers", lambda: [])())
    model.train()
    t0, trained, window = time.time(), 0, []
    last: dict[str, float] = {}
    for step in range(start, steps):
        inputs, labels = next(data)
        on_policy = dcfg is not None and dcfg.on_policy_fraction > 0 and op_rng.random() < dcfg.on_policy_fraction
        lr = opt.param_groups[0]["lr"]
        if on_policy:
            rng = random.Random(cfg.seed * 31 + step)
            chosen = [prompts[rng.randrange(len(prompts))] for _ in range(dcfg.on_policy_prompts)]
            packed = student_samples(model, tokenizer, chosen, dcfg, seq_len=cfg.seq_len, bos_id=bos,
                                     eos_id=eos, pad_id=pad, seed=cfg.seed * 1_000_003 + step)
            model.train()
            inputs, labels = packed.inputs, packed.labels
            loss, parts = _kd_loss(model, teacher, inputs, labels, dcfg)[0], {}
            parts["kd_on_policy"] = float(loss.detach())
        else:
            loss, parts = offpolicy_loss(model, inputs, labels, teacher=teacher, dcfg=dcfg)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not torch.isfinite(gnorm):
            raise TrainingDiverged(f"non-finite gradient norm at step {step}")
        opt.step()
        sched.step()
        if is_moe:
            model.update_expert_bias()
        n_tok = int((labels != IGNORE_INDEX).sum())
        trained += n_tok
        window.append({"loss": float(loss.detach()), **parts})
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            last = _mean_dicts(window)
            window = []
            elapsed = time.time() - t0
            row = {**{f"train/{k}": v for k, v in last.items()}, "train/lr": lr, "train/grad_norm": float(gnorm),
                   "train/tokens_per_s": trained / max(elapsed, 1e-9)}
            if tracker is not None:
                tracker.log_metrics(row, step=done)
            if log is not None:
                log(f"step {done}/{steps} loss {last['loss']:.4f} lr {lr:.2e} "
                    f"{row['train/tokens_per_s']:.0f} tok/s, eta {eta(done - start, steps - start, elapsed)}")
        if checkpoint is not None and (done == steps or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
            checkpoint(done, training_state(model, opt, sched, done))
    seconds = time.time() - t0
    return {
        "steps": float(steps),
        "loss": last.get("loss", float("nan")),
        **{k: v for k, v in last.items() if k != "loss"},
        "trained_tokens": float(trained),
        "examples": float(len(examples)),
        "rows_per_epoch": float(first.inputs.shape[0]),
        "packing_fill": first.fill,
        "truncated_examples": float(first.truncated),
        "seconds": seconds,
    }


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
    """What ``resume`` takes: model, optimizer and scheduler state dicts and the number of steps done."""
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict()}


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


@torch.no_grad()
def completion_loss(model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, str]], *,
                    seq_len: int = 256, batch_size: int = 32) -> dict[str, float]:
    """Mean CE per completion token (and perplexity) of ``examples``, one example per row (no packing)."""
    bos, eos, pad = special_ids(model)
    seqs = tokenize_examples(tokenizer, examples, bos_id=bos, eos_id=eos)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            width = min(seq_len, max(len(q.tokens) for q in chunk) - 1)
            rows = pack_sequences(chunk, width, pad_id=pad, lookback=0)
            h = model.hidden_states(rows.inputs)
            total += float(kernels.fused_linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), model.output_weight(), rows.labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += rows.trained_tokens
    finally:
        model.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}
