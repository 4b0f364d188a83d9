"""The recurring-evaluation history: one JSON list per tracked model reference, and its plot.

A row is what one scheduled evaluation of ``models:/NAME@ALIAS`` found: when, which registry version and
model URI the alias pointed at, and the headline metrics with their standard errors.
"""

from __future__ import annotations

import re
from typing import Any

from infra import storage

HISTORY_DIR = "eval-history"


def history_uri(store_uri: str, model_name: str, alias: str) -> str:
    """``<store>/eval-history/<name>-<alias>.json`` (characters outside [A-Za-z0-9._-] become '_')."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{model_name}-{alias}")
    return storage.join_uri(store_uri, HISTORY_DIR, f"{safe}.json")


def read_history(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    data = storage.read_json(uri)
    if not isinstance(data, list):
        raise ValueError(f"{uri}: an evaluation history is a JSON list of rows")
    return data


def append_history(uri: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Append ``row`` to the history at ``uri`` (created if missing); returns the whole history."""
    rows = read_history(uri)
    rows.append(row)
    storage.write_json(uri, rows)
    return rows


def history_figure(rows: list[dict[str, Any]], title: str):
    """pass@1 and greedy accuracy (± stderr) per evaluation, with the registry version of each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, style in (("pass@1", "o-"), ("greedy_accuracy", "s--")):
        ys = [r["metrics"].get(name) for r in rows]
        if all(y is None for y in ys):
            continue
        es = [r["metrics"].get(f"{name}_stderr") or 0.0 for r in rows]
        ax.errorbar(x, [y if y is not None else float("nan") for y in ys], yerr=es, fmt=style, capsize=3,
                    label=name)
    for i, r in enumerate(rows):
        if r.get("version") is not None:
            ax.annotate(f"v{r['version']}", (i, r["metrics"].get("pass@1") or 0.0), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=7)
    ax.set_xticks(x, [str(r.get("time", ""))[:16].replace("T", "\n") for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
