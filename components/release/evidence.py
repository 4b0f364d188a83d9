"""What a release says about its model beyond the lineage chain (``components.refs.lineage``): the
efficiency ledger and the evaluation metrics.

- ``efficiency_ledger(chain)`` reads the pretraining stage's ledger (tokens, FLOPs, device-hours, cost, MFU)
  and what every other stage reports; nothing is estimated or invented: absent numbers stay absent.
- ``load_evaluation(...)`` picks the released model's row out of an evaluation report and flattens it
  into ``{metric: value}`` (``pass@1``, ``pass@1_stderr``, ``val_loss``, ...), with metrics given in the
  config on top.
"""

from __future__ import annotations

import logging
from typing import Any

from components.refs.lineage import norm_uri
from infra import storage
from infra.contract import RESULT_NAME, ConfigError

log = logging.getLogger(__name__)

# The pretraining stage's result metrics that make up its efficiency ledger (components.training.trainer).
PRETRAIN_LEDGER_METRICS = ("tokens", "flops", "device_hours", "cost_usd", "tokens_per_s", "mfu", "total_params",
                           "active_params", "steps", "train_seconds")
# Extra fields of the full ledger (training.json in the pretrained model directory).
PRETRAIN_LEDGER_EXTRA = ("flops_per_token", "devices", "device", "price_per_device_hour",
                         "device_hours_per_trillion_tokens", "mtp_params", "peak_flops_per_device", "peak_source")
REPORT_NAME = "report.json"


def efficiency_ledger(chain: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"pretrain": {...} | None, "stages": [...], "device_hours", "cost_usd", "complete"}``.

    pretrain: the pretraining stage's ledger numbers that are present (result metrics, then training.json).
    stages: one row per stage of the chain (``stage``, ``key``, ``uri``, ``device_hours``, ``cost_usd``,
    ``seconds`` -- each None when that stage did not report it). device_hours / cost_usd: sums over the
    stages that report them; complete: every stage reported device-hours.
    """
    stages: list[dict[str, Any]] = []
    seen: set[str] = set()
    pretrain: dict[str, Any] | None = None
    for e in chain:
        if not e.get("stage"):
            continue
        key = str(e.get("key") or e["uri"])
        if key in seen:
            continue
        seen.add(key)
        m = e.get("metrics") or {}
        stages.append({"stage": e["stage"], "key": (e.get("key") or "")[:16], "uri": e["uri"],
                       "device_hours": m.get("device_hours"), "cost_usd": m.get("cost_usd"),
                       "seconds": e.get("seconds")})
        if e["stage"] == "pretrain" and pretrain is None:
            pretrain = {k: m[k] for k in PRETRAIN_LEDGER_METRICS if m.get(k) is not None}
            for k in PRETRAIN_LEDGER_EXTRA:
                v = (e.get("ledger") or {}).get(k)
                if v is not None:
                    pretrain[k] = v
            pretrain["uri"] = e["uri"]
            if pretrain.keys() == {"uri"}:
                pretrain = None
    reported = [s for s in stages if s["device_hours"] is not None]
    return {
        "pretrain": pretrain,
        "stages": stages,
        "device_hours": sum(float(s["device_hours"]) for s in reported) if reported else None,
        "cost_usd": (sum(float(s["cost_usd"]) for s in stages if s["cost_usd"] is not None)
                     if any(s["cost_usd"] is not None for s in stages) else None),
        "complete": bool(stages) and len(reported) == len(stages),
    }


# ---- evaluation --------------------------------------------------------------------------------------
def read_report(uri: str) -> tuple[dict[str, Any], str]:
    """(report, URI of its report.json) from an eval stage output, its report directory, or the file."""
    candidates = []
    if uri.rstrip("/").endswith(".json"):
        candidates.append(uri)
    else:
        result_uri = storage.join_uri(uri, RESULT_NAME)
        if not storage.is_published(uri) and storage.exists(result_uri):
            report_dir = (storage.read_json(result_uri).get("outputs") or {}).get("report")
            if report_dir:
                candidates.append(storage.join_uri(report_dir, REPORT_NAME))
        candidates.append(storage.join_uri(uri, REPORT_NAME))
    for c in candidates:
        try:
            report = storage.read_json(c)
        except FileNotFoundError:
            continue
        except storage.StorageError as exc:
            raise ConfigError(f"release.eval_report: {c}: {exc}") from None
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            raise ConfigError(f"release.eval_report: {c} is not an evaluation report (no 'rows' list)")
        return report, c
    raise ConfigError(f"release.eval_report: no {REPORT_NAME} at {uri} (give an eval stage output, its report "
                      "directory, or the report.json file)")


def flatten_row(row: dict[str, Any]) -> dict[str, float]:
    """A report row's metrics as one flat dict (``val_loss`` / ``val_perplexity`` from its val_loss)."""
    out: dict[str, float] = {}
    for k, v in (row.get("metrics") or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    val = row.get("val_loss")
    if isinstance(val, dict):
        if val.get("loss") is not None:
            out["val_loss"] = float(val["loss"])
        if val.get("perplexity") is not None:
            out["val_perplexity"] = float(val["perplexity"])
    return out


def pick_row(report: dict[str, Any], *, model_uris: list[str], row_name: str | None, where: str) -> dict[str, Any]:
    rows = report["rows"]
    names = [r.get("name") for r in rows]
    if row_name is not None:
        for r in rows:
            if r.get("name") == row_name:
                return r
        raise ConfigError(f"release.eval_model: {where} has no row {row_name!r} (rows: {names})")
    wanted = {norm_uri(u) for u in model_uris if u}
    raw = set(model_uris)
    matches = [r for r in rows if (r.get("uri") and norm_uri(r["uri"]) in wanted) or r.get("ref") in raw]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"release.eval_report: {where} does not evaluate the released model "
                          f"({model_uris[0]}); its rows are {names} -- set eval_model to use one of them anyway")
    raise ConfigError(f"release.eval_model: {where} evaluates the released model in several rows {names}; "
                      "set eval_model to one of them")


def load_evaluation(report_uri: str | None, *, model_uris: list[str], row_name: str | None = None,
                    explicit: dict[str, float] | None = None) -> dict[str, Any]:
    """The release's evaluation: ``{"metrics", "sources": {metric: "report" | "config"}, "report_uri",
    "row", "evaluated_uri", "settings", "suite", "by_family"}`` (report fields None without a report)."""
    evaluation: dict[str, Any] = {"metrics": {}, "sources": {}, "report_uri": None, "row": None,
                                  "evaluated_uri": None, "settings": None, "suite": None, "by_family": {}}
    if report_uri:
        report, where = read_report(report_uri)
        row = pick_row(report, model_uris=model_uris, row_name=row_name, where=where)
        metrics = flatten_row(row)
        evaluation.update(metrics=metrics, sources=dict.fromkeys(metrics, "report"), report_uri=where,
                          row=row.get("name"), evaluated_uri=row.get("uri"), settings=report.get("settings"),
                          suite=report.get("suite"), by_family=row.get("by_family") or {})
    from infra.tracking import metric_key

    for k, v in (explicit or {}).items():  # a given metric replaces the report's of the same name
        name = next((r for r in evaluation["metrics"] if metric_key(r) == metric_key(k)), k)
        evaluation["metrics"][name] = float(v)
        evaluation["sources"][name] = "config"
    return evaluation
