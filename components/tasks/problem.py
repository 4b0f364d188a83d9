"""The `Problem` record every task family produces, the prompt template, and the answer extractor.

A problem travels through data prep (prompt + worked completion become pretraining text), RL (prompt is
sampled from, the completion is verified), rejection sampling and evaluation. It is plain data: it can be
written to JSON with `to_dict` and read back with `from_dict`, so only files/URIs cross process
boundaries.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

# R1-Zero-style prompt, kept short for a ~256-token context and a small BPE vocabulary: one line of
# instruction naming the two tags (as in the R1-Zero template), the question, and "A:". The template ends
# with "A:" and NO trailing whitespace, so that the completion starts exactly with "<think>" and the
# prompt/completion boundary tokenises the same way in pretraining text (prompt + completion) and at RL
# sampling time (prompt alone).
PROMPT_TEMPLATE = "Think in <think></think>, answer in <answer></answer>.\nQ: {question}\nA:"

# The same form without the instruction line, for corpora or evals that want the bare question.
COMPACT_TEMPLATE = "Q: {question}\nA:"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """Apply a template with a `{question}` field; the result must leave the completion to open <think>."""
    if "{question}" not in template:
        raise ValueError("prompt template must contain the field '{question}'")
    return template.format(question=question)


def problem_id(question: str) -> str:
    """Stable id of a question: the first 16 hex digits of its SHA-256 (same question -> same id)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def format_completion(solution: str, answer: str) -> str:
    """The completion format the format reward checks and the extractor reads."""
    return f"{THINK_OPEN}{solution}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def extract_answer(text: str) -> str | None:
    """Text inside the LAST <answer>...</answer> pair, stripped; None if there is none or it is empty.

    "Last pair" means the last closing tag and the nearest opening tag before it, so
    "<answer>1<answer>2</answer>" gives "2" and an unclosed "<answer>5" gives None.
    """
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    answer = text[start + len(ANSWER_OPEN) : end].strip()
    return answer or None


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    family: task family name ("arithmetic", ..., or "user" for JSONL tasks).
    id: `problem_id(question)`.
    question: the bare question text; prompt: the question in `PROMPT_TEMPLATE`.
    answer: canonical answer string (what `completion()` puts inside <answer>).
    solution: short worked reasoning ending in the answer (None for user tasks, which have none).
    wrong_solution / wrong_answer: a plausible worked solution with a wrong final answer (None for user
        tasks); `completion(correct=False)` renders them.
    verifier: name of the verifier in `components.tasks.verifiers.VERIFIERS` that checks answers.
    tolerance: absolute tolerance for the numeric/symbolic verifiers (None = exact).
    meta: verifier inputs beyond the answer (e.g. countdown's numbers and target) and provenance.
    """

    family: str
    id: str
    question: str
    answer: str
    prompt: str
    solution: str | None
    wrong_solution: str | None = None
    wrong_answer: str | None = None
    verifier: str = "exact"
    tolerance: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def completion(self, correct: bool = True) -> str:
        """'<think>{solution}</think><answer>{answer}</answer>'; correct=False gives the wrong variant."""
        solution, answer = (self.solution, self.answer) if correct else (self.wrong_solution, self.wrong_answer)
        if solution is None or answer is None:
            kind = "worked" if correct else "wrong worked"
            raise ValueError(f"problem {self.id} ({self.family}) has no {kind} solution")
        return format_completion(solution, answer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        return cls(**data)
