"""Distillation traces: training prompts for the teacher, its verified answers, and the train/val split.

Prompts are fresh problems of the task families (drawn with the traces seed, excluding every problem of
the dataset's held-out evaluation splits) plus user JSONL tasks. The teacher samples ``n_samples``
answers per prompt; ``components.sft.traces.rejection_sample`` keeps the verified-correct ones,
deduplicated, and ``publish_traces`` publishes them as an SFT dataset (``traces.jsonl`` + ``stats.json``;
the format RL's cold start reads too). The student trains on the traces of most prompts; a fixed
fraction of prompts, chosen by a hash of the problem id (stable across runs and seeds), is held out to
measure the completion loss of teacher and student.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.distill.config import TracesConfig


def training_prompts(cfg: TracesConfig, *, families: Sequence[Any], exclude_ids: set[str],
                     task_files: Sequence[Path] = ()) -> list[Any]:
    """Problems to sample traces for: ``n_prompts_per_family`` per family (a name, or a task family with
    its knobs), then the task files' problems."""
    from components.tasks import load_task_file, make_split

    problems = []
    for i, family in enumerate(families):
        problems.extend(make_split(family, cfg.n_prompts_per_family, cfg.seed * 1000 + i, exclude_ids=exclude_ids))
    for path in task_files:
        problems.extend(p for p in load_task_file(path) if p.id not in exclude_ids)
    return problems


def is_val(problem_id: str, val_fraction: float) -> bool:
    """Deterministic held-out assignment of a prompt by the hash of its id."""
    h = int(hashlib.sha256(f"distill-val:{problem_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < val_fraction


def split_traces(traces: Sequence[dict[str, Any]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val): all traces of a prompt go to the same side."""
    train = [t for t in traces if not is_val(t["id"], val_fraction)]
    val = [t for t in traces if is_val(t["id"], val_fraction)]
    return train, val


def collect_traces(teacher: Any, tokenizer: Any, problems: list[Any], cfg: TracesConfig
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(traces, stats): the teacher's verified, distinct answers (see the module docstring)."""
    from components.sft.traces import rejection_sample

    return rejection_sample(teacher, tokenizer, problems, n_samples=cfg.n_samples, temperature=cfg.temperature,
                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                            max_per_problem=cfg.max_per_prompt)
