"""The comparison report: one row per model, quality beside efficiency, as JSON, Markdown and a plot."""

from __future__ import annotations

import math
from typing import Any

QUALITY = ("pass@1", "greedy_accuracy", "format_rate", "mean_response_tokens")


def _pm(row: dict[str, Any], name: str, digits: int = 3) -> str:
    value = row["metrics"].get(name)
    if value is None:
        return "–"
    se = row["metrics"].get(f"{name}_stderr")
    return f"{value:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{value:.{digits}f}"


def _big(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def columns(k_values: list[int]) -> list[str]:
    ks = [k for k in k_values if k != 1]
    return (["model", "pass@1"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]
            + ["greedy", "format", "tokens/answer", "val loss", "total params", "active params", "infer FLOPs/token",
               "device-hours", "cost (USD)"])


def table_rows(rows: list[dict[str, Any]], k_values: list[int]) -> list[dict[str, str]]:
    """Rows of the comparison table as display strings, keyed by `columns(k_values)`."""
    ks = [k for k in k_values if k != 1]
    out = []
    for r in rows:
        eff = r["efficiency"]
        cells = {"model": r["name"], "pass@1": _pm(r, "pass@1")}
        cells.update({f"pass@{k}": _pm(r, f"pass@{k}") for k in ks})
        cells.update({f"maj@{k}": _pm(r, f"maj@{k}") for k in ks})
        cells["greedy"] = _pm(r, "greedy_accuracy")
        cells["format"] = _pm(r, "format_rate", 2)
        cells["tokens/answer"] = _pm(r, "mean_response_tokens", 1)
        val = r.get("val_loss")
        cells["val loss"] = "–" if val is None else f"{val['loss']:.3f} (ppl {val['perplexity']:.1f})"
        cells["total params"] = _big(eff["total_params"])
        cells["active params"] = _big(eff["active_params"])
        cells["infer FLOPs/token"] = _big(eff["flops_per_token"])
        est = "~" if eff.get("cost_estimated") else ""
        cells["device-hours"] = f"{est}{eff['device_hours']:.4f}" if eff.get("device_hours") is not None else "–"
        cells["cost (USD)"] = f"{est}{eff['cost_usd']:.4f}" if eff.get("cost_usd") is not None else "–"
        out.append(cells)
    return out


def markdown_table(rows: list[dict[str, Any]], k_values: list[int]) -> str:
    cols = columns(k_values)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for cells in table_rows(rows, k_values):
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """The whole report: the table, the problems and settings, and how to read it."""
    s = report["settings"]
    suite = report["suite"]
    parts = [
        "# Model comparison",
        "",
        markdown_table(report["rows"], s["k_values"]),
        "",
        f"Problems: {suite['problems']} ({', '.join(f'{k}: {v}' for k, v in suite['by_source'].items())}). "
        f"Sampling: n = {s['n_samples']}, T = {s['temperature']}, top-p = {s['top_p']}, "
        f"max {s['max_new_tokens']} new tokens, seed {s['seed']}.",
        "",
        "pass@1 is averaged over the n samples of each problem; pass@k is the unbiased estimator "
        "1 - C(n-c, k)/C(n, k); maj@k is the majority answer of k samples; ± is the standard error over "
        "problems. device-hours and cost add up every stage in the model's lineage (~ = some stages "
        "estimated from wall-clock time).",
    ]
    return "\n".join(parts) + "\n"


def comparison_figure(rows: list[dict[str, Any]]):
    """pass@1 (± stderr) per model, and pass@1 against active parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    p1 = [r["metrics"]["pass@1"] for r in rows]
    se = [r["metrics"]["pass@1_stderr"] for r in rows]
    active = [r["efficiency"]["active_params"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(range(len(rows)), p1, yerr=se, capsize=4, color="#4c72b0")
    a.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    a.set_ylabel("pass@1")
    a.set_ylim(0, 1)
    a.set_title("quality")
    b.errorbar(active, p1, yerr=se, fmt="o")
    for x, y, n in zip(active, p1, names, strict=True):
        b.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    b.set_xscale("log")
    b.set_xlabel("active parameters per token")
    b.set_ylabel("pass@1")
    b.set_title("quality vs. size")
    fig.tight_layout()
    return fig
