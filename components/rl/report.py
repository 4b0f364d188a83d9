"""What an RL run reports: the reward curve (PNG), its start/end summary, and the sample-completion table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def curve_window(n_steps: int) -> int:
    """Steps averaged for `reward_start` / `reward_end`: a fifth of the run, between 1 and 5."""
    return max(1, min(5, n_steps // 5))


def reward_start_end(history: Sequence[dict[str, float]], key: str = "reward/total") -> tuple[float, float]:
    """Mean of `key` over the first and the last `curve_window` steps (nan, nan for an empty history)."""
    values = [h[key] for h in history]
    if not values:
        return float("nan"), float("nan")
    w = curve_window(len(values))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def reward_curve_figure(history: Sequence[dict[str, float]], evals: Sequence[dict[str, float]] = (),
                        title: str = "GRPO reward"):
    """Total reward, training accuracy and (when used) the steps reward per step, raw and smoothed; held-out
    pass@1 where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [int(h["step"]) for h in history]
    w = max(1, len(steps) // 10)
    for key, label, color in (("reward/total", "reward (total)", "C0"), ("reward/accuracy", "train accuracy", "C1"),
                              ("reward/steps", "steps reward", "C3")):
        values = [h.get(key, 0.0) for h in history]
        if any(values) or (values and key != "reward/steps"):
            ax.plot(steps, values, lw=0.8, alpha=0.35, color=color)
            ax.plot(steps, moving_average(values, w), lw=1.8, color=color, label=f"{label} (avg {w})")
    if evals:
        ax.plot([e["step"] for e in evals], [e["pass@1"] for e in evals], "s--", ms=5, color="C2",
                label="held-out pass@1")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def table_for_prefect(rows: Sequence[dict[str, Any]], max_chars: int = 300) -> list[dict[str, Any]]:
    """Sample rows with long completions shortened (Prefect tables are for reading, not for storage)."""
    out = []
    for r in rows:
        r = dict(r)
        text = str(r.get("completion", ""))
        if len(text) > max_chars:
            r["completion"] = text[: max_chars - 1] + "…"
        out.append(r)
    return out
