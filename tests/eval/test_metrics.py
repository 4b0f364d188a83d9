"""pass@k, maj@k and mean/stderr against hand-computed and brute-force values."""

import itertools
import math
import statistics

import numpy as np
import pytest

from components.scoring import maj_at_k, mean_stderr, pass_at_k


def _brute_force_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_exact_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


@pytest.mark.parametrize(
    ("n", "c", "k"), [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
)
def test_pass_at_k_matches_brute_force_over_subsets(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError, match=r"k=6 .* n=5"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(5, 2, 0)
    with pytest.raises(ValueError, match="c must be in"):
        pass_at_k(5, 6, 1)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(2000, 7, 100)
    exact = 1 - math.comb(1993, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(np.int64(10), np.int64(3), 1) == pytest.approx(0.3)


def test_maj_at_k_picks_the_most_frequent_answer():
    answers = ["4", "5", "5", "4", "5", "4", "4"]
    flags = [a == "5" for a in answers]
    assert maj_at_k(answers, flags, 3) == 1.0  # 5 wins 2-1 among the first three
    assert maj_at_k(answers, flags, 7) == 0.0  # 4 wins 4-3


def test_maj_at_k_ties_go_to_the_answer_seen_first():
    assert maj_at_k(["7", "8", "8", "7"], [True, False, False, True], 4) == 1.0
    assert maj_at_k(["8", "7", "7", "8"], [False, True, True, False], 4) == 0.0


def test_maj_at_k_ignores_none_and_accepts_a_verifier():
    answers = [None, None, "3", None]
    assert maj_at_k(answers, lambda a: a == "3", 4) == 1.0
    assert maj_at_k(answers, lambda a: a == "3", 2) == 0.0  # no votes among the first two
    assert maj_at_k([None, "2", " 2 ", "3"], lambda a: a.strip() == "2", 4) == 1.0  # whitespace-normalised


def test_maj_at_k_rejects_bad_k_and_misaligned_flags():
    with pytest.raises(ValueError, match="k=3 .* n=2"):
        maj_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError, match="flags"):
        maj_at_k(["1", "2"], [True], 1)


def test_mean_stderr():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    mean, stderr = mean_stderr(values)
    assert mean == pytest.approx(0.6)
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(5))
    assert stderr == pytest.approx(math.sqrt(0.3 / 5))
    assert mean_stderr([0.25]) == (0.25, 0.0)
    with pytest.raises(ValueError):
        mean_stderr([])
