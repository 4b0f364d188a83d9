"""The evaluation gate: does a release deserve the `champion` alias?

Pure function of the release's evaluation metrics, the gate config and the current champion (as read
from the registry). Every check is recorded, passed or not, so the model card and the stage result can
show exactly which thresholds were applied and what the champion scored.
"""

from __future__ import annotations

import math
from typing import Any

from infra.tracking import metric_key

from .config import GateConfig


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def evaluate_gate(gate: GateConfig, metrics: dict[str, float], champion: dict[str, Any] | None, *,
                  registry: bool = True) -> dict[str, Any]:
    """The gate decision.

    metrics: the release's evaluation metrics (names in either form, `pass@1` or `pass_at_1`).
    champion: ``{"version", "model_uri", "metrics"}`` of the model version the `champion` alias points
    at, or None when there is none. registry: False when the release is not registered (the champion
    could not be read; the comparison is skipped).

    Returns ``{"passed", "checks": [{"kind", "metric", "value", "threshold" | "champion_value", "ok",
    "detail"}], "champion", "min", "max", "compare", "tolerance", "reasons"}`` (reasons: failed details).
    """
    metrics = {metric_key(k): v for k, v in metrics.items()}
    champion_metrics = {metric_key(k): v for k, v in ((champion or {}).get("metrics") or {}).items()}
    checks: list[dict[str, Any]] = []
    if not metrics:
        checks.append({"kind": "evaluated", "metric": None, "value": None, "ok": False,
                       "detail": "the release has no evaluation metrics (give eval_report or metrics)"})
    for name, lo in sorted(gate.min.items()):
        v = _num(metrics.get(name))
        ok = v is not None and v >= lo
        detail = (f"{name} = {v:.4g} >= {lo:.4g}" if ok else
                  f"{name} missing from the release's metrics" if v is None else f"{name} = {v:.4g} < {lo:.4g}")
        checks.append({"kind": "min", "metric": name, "value": v, "threshold": lo, "ok": ok, "detail": detail})
    for name, hi in sorted(gate.max.items()):
        v = _num(metrics.get(name))
        ok = v is not None and v <= hi
        detail = (f"{name} = {v:.4g} <= {hi:.4g}" if ok else
                  f"{name} missing from the release's metrics" if v is None else f"{name} = {v:.4g} > {hi:.4g}")
        checks.append({"kind": "max", "metric": name, "value": v, "threshold": hi, "ok": ok, "detail": detail})

    tol = gate.tolerance
    for name, direction in sorted(gate.compare.items()):
        v = _num(metrics.get(name))
        check: dict[str, Any] = {"kind": "champion", "metric": name, "direction": direction, "value": v,
                                 "champion_value": None}
        if v is None:
            check.update(ok=False, detail=f"{name} missing from the release's metrics: cannot compare with "
                                          "the champion")
        elif not registry:
            check.update(ok=True, detail=f"{name}: not compared (release not registered, champion unknown)")
        elif champion is None:
            check.update(ok=True, detail=f"{name} = {v:.4g}; no champion yet")
        else:
            cv = _num(champion_metrics.get(name))
            check["champion_value"] = cv
            ver = champion.get("version")
            if cv is None:
                check.update(ok=False, detail=f"champion (version {ver}) has no {name}: cannot show the release "
                                              "is not worse (drop it from gate.compare to skip)")
            elif direction == "higher":
                ok = v >= cv - tol
                check.update(ok=ok, detail=f"{name} = {v:.4g} {'>=' if ok else '<'} champion v{ver}'s "
                                           f"{cv:.4g}" + (f" - {tol:g}" if tol else ""))
            else:
                ok = v <= cv + tol
                check.update(ok=ok, detail=f"{name} = {v:.4g} {'<=' if ok else '>'} champion v{ver}'s "
                                           f"{cv:.4g}" + (f" + {tol:g}" if tol else ""))
        checks.append(check)

    passed = all(c["ok"] for c in checks)
    return {
        "passed": passed,
        "checks": checks,
        "champion": champion,
        "min": dict(gate.min),
        "max": dict(gate.max),
        "compare": dict(gate.compare),
        "tolerance": tol,
        "reasons": [c["detail"] for c in checks if not c["ok"]],
    }
