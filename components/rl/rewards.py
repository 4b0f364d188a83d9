"""Rule-based rewards for R1-style RL: accuracy (verified answer), format, DAPO's overlong penalty, and
optionally the worked steps.

    total = accuracy_weight * accuracy + format_weight * format + overlong_weight * overlong
            + steps_weight * steps

accuracy  1 if the verifier says the answer is correct, else 0. A verifier *failure* (timeout, error) also
          gets 0, but is counted separately (`n_timeout`, `n_error`) so it never passes for a wrong answer.
format    1 if the completion is exactly `<think>...</think><answer>...</answer>` (each tag once, in that
          order, whitespace allowed around the blocks, a non-empty answer), else 0.
overlong  DAPO's soft overlong punishment on the completion length L (tokens):
              0                                    L <= L_max - L_cache
              ((L_max - L_cache) - L) / L_cache    L_max - L_cache < L <= L_max   (0 down to -1)
              -1                                   L > L_max, or the completion was truncated
          (L_max = `max_completion_len`, L_cache = `overlong_cache_len`; L_cache = 0 makes it a hard cut.)
steps     for families whose worked solution is canonical (`TaskFamily.canonical_steps`: arithmetic's one
          left-to-right chain), the share of the solution's steps that the <think> block writes out
          correctly before its first wrong step: "8+3=11. 11-2=9." gets 1/2 for "8+3=11. 11-2=8.", 0 for
          "8+3=10. 10-2=8." and for a broken format. The outcome reward says only *whether* a chain went
          wrong; this says where, which a model that must learn each arithmetic fact needs (credit for the
          right first step of a chain whose second is wrong). Rule-checked like the others, it pays only
          for steps that are both on the chain and true, so it has nothing to hack; it is 0 for every
          problem without a canonical solution (user tasks, countdown, ...), adding nothing there.

`completions_text` are the decoded completions without the prompt and without EOS/padding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.tasks import FAMILIES, Problem, SandboxPool, VerifyResult, verify_batch

_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_STEP_END = re.compile(r"\.(?:\s+|$)")  # a step ends at a period followed by whitespace or the end
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class RewardConfig(BaseModel):
    """Weights and length limits of the RL reward."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accuracy_weight: float = Field(1.0, description="weight of the accuracy reward (1 if verified correct)")
    format_weight: float = Field(
        0.1, description="weight of the format reward (1 if <think>..</think><answer>..</answer>)"
    )
    overlong_weight: float = Field(1.0, ge=0, description="weight of DAPO's overlong penalty (0 to -1)")
    steps_weight: float = Field(
        0.0, ge=0, description="weight of the steps reward (share of a canonical worked solution's steps written "
        "out right before the first wrong one; 0 = off)"
    )
    max_completion_len: int = Field(192, ge=1, description="L_max: completion tokens where generation stops")
    overlong_cache_len: int = Field(
        32, ge=0, description="L_cache: the last L_cache tokens before L_max ramp the penalty from 0 to -1"
    )
    verify_timeout_s: float = Field(5.0, gt=0, description="per-answer timeout of sandboxed verifiers")

    @model_validator(mode="after")
    def _cache_fits(self) -> RewardConfig:
        if self.overlong_cache_len >= self.max_completion_len:
            raise ValueError(
                f"overlong_cache_len ({self.overlong_cache_len}) must be < max_completion_len "
                f"({self.max_completion_len}); lower overlong_cache_len"
            )
        return self


@dataclass(frozen=True)
class RewardBatch:
    """Per-sample reward components (float32, shape (B,)) and verifier bookkeeping."""

    accuracy: torch.Tensor
    format: torch.Tensor
    overlong: torch.Tensor
    steps: torch.Tensor
    total: torch.Tensor
    verify: list[VerifyResult]
    n_timeout: int
    n_error: int
    n_no_answer: int

    def metrics(self) -> dict[str, float]:
        """Batch means and verifier counts, for logging."""
        return {
            "reward/total": self.total.mean().item(),
            "reward/accuracy": self.accuracy.mean().item(),
            "reward/format": self.format.mean().item(),
            "reward/overlong": self.overlong.mean().item(),
            "reward/steps": self.steps.mean().item(),
            "verifier/timeouts": float(self.n_timeout),
            "verifier/errors": float(self.n_error),
            "verifier/no_answer": float(self.n_no_answer),
        }


def format_reward(text: str) -> float:
    """1.0 if `text` is exactly one <think> block then one non-empty <answer> block, else 0.0."""
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _FORMAT.fullmatch(text)
    return 1.0 if match is not None and match[2].strip() else 0.0


def _steps(text: str) -> list[str]:
    return [re.sub(r"\s+", "", step) for step in _STEP_END.split(text) if step.strip()]


def steps_reward(problem: Problem, text: str) -> float:
    """Share of `problem`'s canonical worked steps that `text`'s <think> block gets right, counted from the
    first step up to the first wrong one (whitespace inside a step ignored); 0.0 without a canonical
    solution or with a broken format."""
    family = FAMILIES.get(problem.family)
    if family is None or not family.canonical_steps or not problem.solution or not format_reward(text):
        return 0.0
    reference = _steps(problem.solution)
    match = _FORMAT.fullmatch(text)
    assert match is not None  # format_reward passed
    right = 0
    for want, got in zip(reference, _steps(match[1]), strict=False):
        if want != got:
            break
        right += 1
    return right / len(reference) if reference else 0.0


def overlong_penalty(length: torch.Tensor, truncated: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment per sample (see the module docstring); float32 (B,)."""
    length = length.to(torch.float32)
    soft_start = max_len - cache_len
    if cache_len > 0:
        ramp = ((soft_start - length) / cache_len).clamp(-1.0, 0.0)
    else:
        ramp = torch.zeros_like(length)
    return torch.where(truncated.bool() | (length > max_len), torch.full_like(length, -1.0), ramp)


def compute_rewards(
    problems: Sequence[Problem],
    completions_text: Sequence[str],
    completion_lengths: Sequence[int] | torch.Tensor,
    truncated: Sequence[bool] | torch.Tensor,
    cfg: RewardConfig,
    *,
    sandbox: SandboxPool | None = None,
) -> RewardBatch:
    """Rewards of B completions; `problems[i]` is the problem completion i answers."""
    lengths = torch.as_tensor(completion_lengths)
    cut = torch.as_tensor(truncated)
    sizes = {len(problems), len(completions_text), lengths.numel(), cut.numel()}
    if len(sizes) != 1:
        raise ValueError(
            f"compute_rewards needs one entry per completion: {len(problems)} problems, "
            f"{len(completions_text)} completions, {lengths.numel()} lengths, {cut.numel()} truncated flags"
        )
    results = verify_batch(list(zip(problems, completions_text, strict=True)), cfg.verify_timeout_s, sandbox=sandbox)
    accuracy = torch.tensor([1.0 if r.correct else 0.0 for r in results], dtype=torch.float32)
    fmt = torch.tensor([format_reward(text) for text in completions_text], dtype=torch.float32)
    overlong = overlong_penalty(lengths.reshape(-1), cut.reshape(-1), cfg.max_completion_len, cfg.overlong_cache_len)
    steps = torch.tensor([steps_reward(p, text) if cfg.steps_weight else 0.0
                          for p, text in zip(problems, completions_text, strict=True)], dtype=torch.float32)
    total = (cfg.accuracy_weight * accuracy + cfg.format_weight * fmt + cfg.overlong_weight * overlong
             + cfg.steps_weight * steps)
    return RewardBatch(
        accuracy=accuracy,
        format=fmt,
        overlong=overlong,
        steps=steps,
        total=total,
        verify=results,
        n_timeout=sum(r.status == "timeout" for r in results),
        n_error=sum(r.status == "error" for r in results),
        n_no_answer=sum(r.status == "no_answer" for r in results),
    )
