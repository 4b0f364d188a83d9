"""Rejection sampling: a policy's verified-correct, deduplicated completions become an SFT dataset.

DeepSeek-R1 collects its reasoning SFT data this way (sample from the RL checkpoint, keep the correct
answers, drop duplicates) and distills students on it. The published dataset directory::

    traces.jsonl   one JSON object a line: {"prompt", "completion", "family", "id"}
    stats.json     problems, samples, kept traces, per-family counts, verifier outcomes, sampling settings
    MANIFEST.json  written last by `infra.storage.publish_dir`

`components.sft.sft.sft_train(model, tokenizer, load_traces(uri), cfg)` trains on it directly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from components.model.generate import generate
from components.tasks import Problem, verify_batch

TRACES_FILE = "traces.jsonl"
STATS_FILE = "stats.json"


def _canonical(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def rejection_sample(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    n_samples: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 0,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 64,
    max_per_problem: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample `n_samples` completions per problem; keep the verified-correct ones, deduplicated per problem
    (whitespace-normalised text), at most `max_per_problem` each (None = all distinct ones).

    Returns (traces: [{"prompt", "completion", "family", "id"}] in problem order, stats). Generation stops
    at `</answer>`; a completion cut at the length limit is never kept. Deterministic for a given model,
    problems, arguments and seed (each batch has its own seed).
    """
    from components.model.tokens import encode_prompts, token_id

    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    problems = list(problems)
    stop = token_id(tokenizer, "</answer>")
    bos = model.cfg.bos_token_id
    traces: list[dict[str, Any]] = []
    counts = {"samples": 0, "correct": 0, "truncated": 0, "duplicates": 0, "verifier_failures": 0}
    by_family: dict[str, dict[str, int]] = {}
    solved = 0
    for b, start in enumerate(range(0, len(problems), batch_size)):
        chunk = problems[start : start + batch_size]
        ids = encode_prompts(tokenizer, [p.prompt for p in chunk], bos)
        results = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, stop_token_ids=[] if stop is None else [stop], seed=seed * 1_000_003 + b,
                           num_samples=n_samples)
        texts = [tokenizer.decode(r.tokens) for r in results]
        verdicts = verify_batch([(chunk[r.prompt_index], t) for r, t in zip(results, texts, strict=True)])
        for i, p in enumerate(chunk):
            fam = by_family.setdefault(p.family, {"problems": 0, "samples": 0, "correct": 0, "kept": 0})
            fam["problems"] += 1
            seen: set[str] = set()
            kept = 0
            for s in range(n_samples):
                k = i * n_samples + s
                r, text, v = results[k], texts[k], verdicts[k]
                counts["samples"] += 1
                fam["samples"] += 1
                if v.correct is None:
                    counts["verifier_failures"] += 1
                if r.finish_reason == "length":
                    counts["truncated"] += 1
                    continue
                if not v.correct:
                    continue
                counts["correct"] += 1
                fam["correct"] += 1
                key = _canonical(text)
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                if max_per_problem is not None and kept >= max_per_problem:
                    continue
                seen.add(key)
                kept += 1
                traces.append({"prompt": p.prompt, "completion": text.strip(), "family": p.family, "id": p.id})
            fam["kept"] += kept
            solved += kept > 0
    stats = {
        "problems": len(problems), **counts, "kept": len(traces), "problems_solved": solved,
        "accept_rate": counts["correct"] / max(counts["samples"], 1), "by_family": by_family,
        "sampling": {"n_samples": n_samples, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                     "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                     "max_per_problem": max_per_problem},
    }
    return traces, stats


def write_traces(traces: Sequence[dict[str, Any]], stats: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `traces.jsonl` and `stats.json` into `out_dir` (created; must not hold other traces)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / TRACES_FILE, "w", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps({k: t[k] for k in ("prompt", "completion", "family", "id")}, ensure_ascii=False) + "\n")
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return out


def publish_traces(traces: Sequence[dict[str, Any]], stats: dict[str, Any], uri: str, *,
                   workdir: str | Path, meta: dict[str, Any] | None = None) -> str:
    """Publish the traces as an SFT dataset directory at `uri` (atomically: the manifest is written last)."""
    from infra import storage

    local = Path(workdir) / "traces-staging"
    shutil.rmtree(local, ignore_errors=True)
    write_traces(traces, stats, local)
    storage.publish_dir(local, uri, meta={"kind": "sft-traces", "traces": len(traces), **(meta or {})},
                        overwrite=True)
    shutil.rmtree(local, ignore_errors=True)
    return uri


def load_traces(uri_or_dir: str | Path) -> list[dict[str, Any]]:
    """The traces of a published SFT dataset (a URI with a manifest is fetched and verified first), or of a
    local directory / `.jsonl` file. Each row needs string `prompt` and `completion`."""
    from infra import storage

    src = str(uri_or_dir)
    if storage.is_published(src):
        path = storage.fetch_dir(src) / TRACES_FILE
    else:
        path = Path(src.removeprefix("file://"))
        if path.is_dir():
            path = path / TRACES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{uri_or_dir}: no {TRACES_FILE} (not an SFT traces dataset)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:{n}: needs string fields 'prompt' and 'completion'")
            rows.append(row)
    return rows
