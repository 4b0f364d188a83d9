"""Evaluation; `pass_at_k`, `maj_at_k` and `mean_stderr` are the metrics every report uses."""

from components.eval.metrics import maj_at_k, mean_stderr, pass_at_k

__all__ = ["maj_at_k", "mean_stderr", "pass_at_k"]
