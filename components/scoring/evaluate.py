"""Evaluate a model on verifiable problems, and its loss on a dataset split.

`evaluate` samples ``n_samples`` completions per problem at ``temperature``/``top_p`` (DeepSeek-R1's
protocol: T = 0.6, top-p 0.95) plus one greedy completion, verifies them, and reports, each with its
standard error over problems (the problems are the sample; ``components.scoring.metrics.mean_stderr``):

- ``pass@1``: per problem c/n (c correct of n samples), averaged;
- ``pass@k``: per problem the unbiased estimator ``1 - C(n-c, k)/C(n, k)``, averaged (k <= n);
- ``maj@k``: per problem, the majority answer of the first k samples is correct;
- ``greedy_accuracy``: the greedy completion is correct;
- ``format_rate``: fraction of samples of the form ``<think>...</think><answer>...</answer>``;
- ``mean_response_tokens``: generated tokens per sample (stop token included).

Generation stops at eos or at the ``</answer>`` token (nothing after the first answer is read).
Determinism: prompts are generated in fixed batches of ``batch_size`` problems in the given order, each
batch from its own generator seeded from ``seed`` and the batch index, so the same model, problems,
arguments and seed give the same samples and numbers (batch_size is part of that key: it changes which
random numbers each problem draws).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import kernels
from components.model.generate import generate
from components.model.tokens import encode_prompts, token_id
from components.scoring.metrics import maj_at_k, mean_stderr, pass_at_k
from components.tasks import Problem, extract_answer, verify_batch

IGNORE_INDEX = -100
FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.+?</answer>\s*", re.DOTALL)


def format_ok(text: str) -> bool:
    """The R1 format: one ``<think>...</think>`` then one non-empty ``<answer>...</answer>``, nothing else."""
    return FORMAT_RE.fullmatch(text) is not None and text.count("<answer>") == 1


def as_problems(problems: Sequence[Problem | dict[str, Any]]) -> list[Problem]:
    """Problems from `Problem`s or their dicts (`Problem.to_dict`, as in a dataset's ``eval/*.jsonl``)."""
    out = []
    for i, p in enumerate(problems):
        if isinstance(p, Problem):
            out.append(p)
            continue
        try:
            out.append(Problem.from_dict(dict(p)))
        except TypeError as exc:
            raise ValueError(f"problem {i}: not a Problem record ({exc})") from None
    return out


def _generate_all(model, tokenizer, problems: list[Problem], *, n: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int, batch_size: int, stop_ids: list[int]) -> list[list[Any]]:
    """Per problem, its ``n`` GenerationResults (batched, seeded per batch)."""
    out: list[list[Any]] = []
    for b, start in enumerate(range(0, len(problems), batch_size)):
        chunk = problems[start : start + batch_size]
        ids = encode_prompts(tokenizer, [p.prompt for p in chunk], model.cfg.bos_token_id)
        results = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_token_ids=stop_ids, tokenizer=tokenizer, seed=seed * 1_000_003 + b,
                           num_samples=n)
        out.extend(results[i * n : (i + 1) * n] for i in range(len(chunk)))
    return out


def _summary(values: Sequence[float]) -> tuple[float, float]:
    mean, se = mean_stderr(list(values))
    return float(mean), float(se)


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem | dict[str, Any]],
    *,
    n_samples: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    k_values: Sequence[int] = (1,),
    seed: int = 0,
    greedy: bool = True,
    batch_size: int = 64,
    keep_samples: bool = True,
) -> dict[str, Any]:
    """Sample, verify and score ``problems`` (see the module docstring).

    Returns ``{"metrics": {name: value, name + "_stderr": se, ...}, "by_family": {family: metrics},
    "n_problems", "n_samples", "samples": [per-sample records]}``; a record holds problem_id, family,
    sample (index, or "greedy"), text, answer, correct, format_ok, tokens, finish_reason.
    """
    probs = as_problems(problems)
    if not probs:
        raise ValueError("evaluate needs at least one problem")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    bad = [k for k in k_values if not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"k_values {bad} must lie in [1, n_samples={n_samples}]")
    stop_ids = [t for t in (token_id(tokenizer, "</answer>"),) if t is not None]
    gen = dict(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, stop_ids=stop_ids)
    sampled = _generate_all(model, tokenizer, probs, n=n_samples, temperature=temperature, top_p=top_p, **gen)
    greedy_res = (_generate_all(model, tokenizer, probs, n=1, temperature=0.0, top_p=1.0, **gen)
                  if greedy else [[] for _ in probs])

    items, where = [], []
    for i, p in enumerate(probs):
        for s, r in enumerate(sampled[i]):
            items.append((p, r.text or ""))
            where.append((i, s, r))
        for r in greedy_res[i]:
            items.append((p, r.text or ""))
            where.append((i, "greedy", r))
    verdicts = verify_batch(items)

    records = []
    for (i, s, r), (p, text), v in zip(where, items, verdicts, strict=True):
        answer = extract_answer(text)
        records.append({"problem_index": i, "problem_id": p.id, "family": p.family, "sample": s, "text": text,
                        "answer": answer, "correct": bool(v.correct), "verify_status": v.status,
                        "format_ok": format_ok(text), "tokens": len(r.tokens), "finish_reason": r.finish_reason})
    per_problem = _per_problem(probs, records, n_samples, k_values, greedy)
    result = {
        "n_problems": len(probs),
        "n_samples": n_samples,
        "settings": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                     "k_values": list(k_values), "seed": seed, "greedy": greedy, "batch_size": batch_size},
        "metrics": _aggregate(per_problem),
        "by_family": {fam: _aggregate([row for row in per_problem if row["family"] == fam])
                      for fam in sorted({p.family for p in probs})},
    }
    if keep_samples:
        result["samples"] = records
    return result


def _per_problem(probs: list[Problem], records: list[dict[str, Any]], n: int, k_values: Sequence[int],
                 greedy: bool) -> list[dict[str, Any]]:
    """One row of per-problem scores per problem (the values whose means and stderrs are reported)."""
    grouped: list[list[dict[str, Any]]] = [[] for _ in probs]
    for r in records:
        grouped[r["problem_index"]].append(r)
    rows = []
    for p, recs in zip(probs, grouped, strict=True):
        samples = [r for r in recs if r["sample"] != "greedy"]
        c = sum(r["correct"] for r in samples)
        row: dict[str, Any] = {"family": p.family, "pass@1": c / n}
        for k in k_values:
            row[f"pass@{k}"] = pass_at_k(n, c, k)
            row[f"maj@{k}"] = maj_at_k([r["answer"] for r in samples], [r["correct"] for r in samples], k)
        if greedy:
            row["greedy_accuracy"] = float(next(r["correct"] for r in recs if r["sample"] == "greedy"))
        row["format_rate"] = sum(r["format_ok"] for r in samples) / n
        row["mean_response_tokens"] = sum(r["tokens"] for r in samples) / n
        rows.append(row)
    return rows


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {"problems": float(len(rows))}
    if not rows:
        return out
    for name in [k for k in rows[0] if k != "family"]:
        mean, se = _summary([r[name] for r in rows])
        out[name] = mean
        out[f"{name}_stderr"] = se
    return out


@torch.no_grad()
def validation_loss(model: Any, dataset_dir: str | Path, split: str = "val", max_rows: int = 64,
                    batch_size: int = 16) -> dict[str, float]:
    """Next-token loss (nats per token) and perplexity on the first ``max_rows`` rows of a prepared
    dataset's split (every target of a packed row counts; no MTP or balance terms)."""
    import numpy as np

    from components.dataset.format import PackedDataset

    ds = PackedDataset(dataset_dir, split)
    n = min(len(ds), max_rows)
    if n == 0:
        raise ValueError(f"{dataset_dir}: split {split!r} has no rows")
    S = min(ds.seq_len, model.cfg.max_position_embeddings)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            rows = torch.from_numpy(np.stack([ds[i][: S + 1] for i in range(start, min(n, start + batch_size))]))
            inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            h = model.hidden_states(inputs)
            total += float(kernels.fused_linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), model.output_weight(), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += labels.numel()
    finally:
        model.train(was)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count), "rows": float(n)}
