"""Scoring models on verifiable problems, shared by RL (held-out accuracy) and the eval stage.

`pass_at_k`, `maj_at_k` and `mean_stderr` are the metrics every report uses; sampling evaluation and
validation loss: ``from components.scoring.evaluate import evaluate, validation_loss`` (not re-exported here:
the function `evaluate` would clash with its module's name, and the module imports torch, which the
metrics alone do not need).
"""

from components.scoring.metrics import maj_at_k, mean_stderr, pass_at_k

__all__ = ["maj_at_k", "mean_stderr", "pass_at_k"]
