"""Evaluation metrics: unbiased pass@k, majority vote (maj@k / cons@k), mean with standard error."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials. c = 0 gives 0,
    n - c < k gives 1 (every k-subset holds a correct sample); k > n is an error (k samples were not drawn).
    """
    try:
        if any(isinstance(value, bool) for value in (n, c, k)):
            raise TypeError
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise TypeError(f"pass_at_k: n, c and k must be integers, got n={n!r}, c={c!r}, k={k!r}") from None
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got c={c}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    miss_all = 1.0
    for i in range(n - c + 1, n + 1):
        miss_all *= 1.0 - k / i
    return 1.0 - miss_all


def _normalize(answer: str) -> str:
    return " ".join(answer.split())


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool | None] | Callable[[str], bool],
    k: int,
    *,
    key: Callable[[str], Hashable] = _normalize,
) -> float:
    """1.0 if the majority answer among the first k samples is correct, else 0.0.

    answers: extracted answers per sample; None (no answer) does not vote.
    correct: per-sample correctness flags aligned with `answers`, or a verifier answer -> bool.
    key: what makes two answers the same vote (default: whitespace-normalised text).
    Ties are broken deterministically in favour of the tied answer that appears FIRST among the k samples
    (order of sampling, so the result does not depend on hashing). With no votes the score is 0.0. With
    flags, the winner's correctness is the flag of its first occurrence.
    """
    if k < 1:
        raise ValueError(f"maj_at_k: k must be >= 1, got k={k}")
    if k > len(answers):
        raise ValueError(f"maj_at_k: k={k} is larger than the number of answers n={len(answers)}")
    if not callable(correct) and len(correct) != len(answers):
        raise ValueError(f"maj_at_k: {len(correct)} correctness flags for {len(answers)} answers")
    votes: dict[Hashable, int] = {}
    first_index: dict[Hashable, int] = {}
    for index, answer in enumerate(answers[:k]):
        if answer is None:
            continue
        vote = key(answer)
        votes[vote] = votes.get(vote, 0) + 1
        first_index.setdefault(vote, index)
    if not votes:
        return 0.0
    winner = min(votes, key=lambda vote: (-votes[vote], first_index[vote]))
    index = first_index[winner]
    if callable(correct):
        return 1.0 if correct(answers[index]) else 0.0
    return 1.0 if correct[index] else 0.0


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) with stderr = std(ddof=1) / sqrt(n); stderr is 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
