"""User tasks from a JSONL file: one problem per line.

    {"prompt": "What is 2+2?", "answer": "4", "verifier": "numeric", "tolerance": 0}

prompt: the question, a non-empty string; it is put in `PROMPT_TEMPLATE` like every other question.
answer: the reference answer, a string or a number.
verifier: "exact" (default; whitespace-normalised string equality), "numeric" (ints, decimals, "p/q"),
    or "symbolic" (sympy equivalence, run in the sandbox).
tolerance: optional absolute tolerance >= 0, only for "numeric" and "symbolic".

Blank lines are skipped. Any other problem (invalid JSON, a missing or unknown field, a reference the
verifier cannot read, a duplicated prompt) raises `TaskFileError` with "file:line: reason". User tasks
have no worked solution: `completion()` raises for them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from components.tasks.problem import Problem, format_prompt, problem_id
from components.tasks.verifiers import parse_number, symbolic_syntax_error

USER_FAMILY = "user"
USER_VERIFIERS = ("exact", "numeric", "symbolic")
_FIELDS = {"prompt", "answer", "verifier", "tolerance"}


class TaskFileError(ValueError):
    """A task file line is invalid; the message starts with "file:line:"."""


def _parse_line(record: Any) -> tuple[str, str, str, float | None]:
    """(question, answer, verifier, tolerance) of one decoded line; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    question = record.get("prompt")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'prompt' must be a non-empty string")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError("'answer' must be a string or a number")
    answer = str(answer).strip()
    if not answer:
        raise ValueError("'answer' is empty")
    verifier = record.get("verifier", "exact")
    if verifier not in USER_VERIFIERS:
        raise ValueError(f"'verifier' must be one of {list(USER_VERIFIERS)}, got {verifier!r}")
    tolerance = record.get("tolerance")
    if tolerance is not None:
        if verifier == "exact":
            raise ValueError("'tolerance' applies only to the numeric and symbolic verifiers")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not (math.isfinite(tolerance) and tolerance >= 0)
        ):
            raise ValueError(f"'tolerance' must be a finite number >= 0, got {tolerance!r}")
        tolerance = float(tolerance)
    if verifier == "numeric" and parse_number(answer) is None:
        raise ValueError(f"'answer' {answer!r} is not a number (int, decimal or p/q) for verifier numeric")
    if verifier == "symbolic" and (reason := symbolic_syntax_error(answer)) is not None:
        raise ValueError(f"'answer' {answer!r} is not accepted by verifier symbolic: {reason}")
    return question, answer, verifier, tolerance


def load_task_file(path: str | Path) -> list[Problem]:
    """Problems of a JSONL task file (family "user", meta {"source": "file:line"})."""
    path = Path(path)
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
                question, answer, verifier, tolerance = _parse_line(record)
                pid = problem_id(question)
                if pid in first_line:
                    raise ValueError(f"duplicate prompt (same as line {first_line[pid]})")
            except ValueError as exc:
                raise TaskFileError(f"{path}:{line_no}: {exc}") from None
            first_line[pid] = line_no
            problems.append(
                Problem(
                    family=USER_FAMILY,
                    id=pid,
                    question=question,
                    answer=answer,
                    prompt=format_prompt(question),
                    solution=None,
                    verifier=verifier,
                    tolerance=tolerance,
                    meta={"source": f"{path}:{line_no}"},
                )
            )
    if not problems:
        raise TaskFileError(f"{path}: no tasks in file")
    return problems


def local_task_file(uri: str, dest: Path, *, field: str) -> Path:
    """A local path to a user task file: downloaded to `dest` when `uri` is remote, else used in place.
    A missing file is a ConfigError naming the config `field`."""
    from infra import storage
    from infra.contract import ConfigError

    if storage.is_remote(uri):
        storage.get_file(uri, dest)
        return dest
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"{field}: {uri} does not exist")
    return path
