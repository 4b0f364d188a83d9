"""The whole DeepSeek lifecycle as one flow: prep -> pretrain -> RL -> distill -> evaluate (base, RL
teacher, student) -> release (teacher and student).

One parent MLflow run; every stage's job opens a child run under it. Each stage's outputs feed the next
as URIs. Stage outputs are content-addressed, so re-running the same pipeline finds every finished stage
at once, and after a failure only the failed stage and those after it run again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import registry
from flows.common import PRESETS_DIR, convenience, flow_log, parent_run, run_stage
from flows.references import resolve_references
from infra.contract import ConfigError, Resources, StageResult
from infra.settings import get_settings

SECTIONS = tuple(registry.STAGES)  # a pipeline preset has one section per stage, in pipeline order
EVAL_NAMES = ("base", "rl", "student")


def load_preset(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A preset's sections (a name in configs/, or a YAML path) with `section.key=value` overrides applied;
    every section is validated before anything runs, so a typo in the last stage fails in seconds."""
    from infra.configfile import apply_overrides, load_yaml

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{preset}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"preset {preset!r}: no such file {path} (known presets: {known})")
    data = apply_overrides(load_yaml(path), list(overrides or []))
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown sections {unknown}; a pipeline preset has {list(SECTIONS)}")
    cfg = {name: dict(data.get(name) or {}) for name in SECTIONS}
    placeholders = {"eval": {"models": [{"uri": "models:/placeholder@x"}]}, "release": {"name": "placeholder"}}
    for name in SECTIONS:
        section = {k: v for k, v in cfg[name].items() if k not in ("teacher_name", "student_name")}
        mine = [o.removeprefix(f"{name}.") for o in overrides or [] if o.startswith(f"{name}.")]
        registry.get(name).validate({**section, **placeholders.get(name, {})}, source=str(path), overrides=mine)
    return cfg


def _resources(section: dict[str, Any]) -> Resources | None:
    return Resources.model_validate(section["resources"]) if "resources" in section else None


def _stage(stage: str, config: dict[str, Any], parent_run_id: str, timings: dict[str, float],
           name: str | None = None) -> StageResult:
    """Run one stage; its wall time (including a cached look-up) is recorded under `name` (default: stage)."""
    name = name or stage
    t0 = time.time()
    # the pipeline wires each stage's inputs itself; a `latest:` reference that a custom preset leaves in
    # another field (e.g. distill.student.init) is resolved as in a stage's own flow
    config = resolve_references(stage, config, hint=lambda path: f"override {stage}.{path}=<URI>", log=flow_log)
    result = run_stage.with_options(task_run_name=name)(stage, config, parent_run_id,
                                                         resources=_resources(config))
    timings[name] = round(time.time() - t0, 2)
    return result


@flow(name="pipeline", description="prep -> pretrain -> RL -> distill -> eval -> release, end to end.")
def pipeline_flow(preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole lifecycle from a preset.

    Args:
        preset: a preset name in configs/ (e.g. tiny) or a preset YAML path.
        overrides: `section.key=value` strings applied to the preset, e.g. `pretrain.steps=100`.
    """
    cfg = load_preset(preset, overrides)
    timings: dict[str, float] = {}
    results: dict[str, StageResult] = {}
    with parent_run("pipeline", params={"preset": preset, "overrides": overrides or [], **cfg}) as parent:
        pid = parent.run_id
        results["prep"] = _stage("prep", cfg["prep"], pid, timings)
        dataset = results["prep"].outputs["dataset"]
        results["pretrain"] = _stage("pretrain", {**cfg["pretrain"], "dataset": dataset}, pid, timings)
        base = results["pretrain"].outputs["checkpoint"]
        results["rl"] = _stage("rl", {**cfg["rl"], "model": base, "dataset": dataset}, pid, timings)
        teacher = results["rl"].outputs["checkpoint"]
        results["distill"] = _stage("distill", {**cfg["distill"], "teacher": teacher, "dataset": dataset},
                                    pid, timings)
        student = results["distill"].outputs["student"]
        models = [{"uri": u, "name": n} for u, n in zip((base, teacher, student), EVAL_NAMES, strict=True)]
        suite = {**cfg["eval"].get("suite", {}), "dataset": dataset}
        results["eval"] = _stage("eval", {**cfg["eval"], "models": models, "suite": suite}, pid, timings)
        report = results["eval"].outputs["report"]
        release_cfg = dict(cfg["release"])
        names = {"teacher": release_cfg.pop("teacher_name", "moeflow-teacher"),
                 "student": release_cfg.pop("student_name", "moeflow-student")}
        for role, uri, row in (("teacher", teacher, "rl"), ("student", student, "student")):
            results[f"release-{role}"] = _stage(
                "release", {**release_cfg, "model": uri, "eval_report": report, "eval_model": row,
                            "name": names[role]}, pid, timings, name=f"release-{role}")
        summary = summarize(results, timings)
        summary["mlflow_run_id"] = pid
        parent.log_metrics({f"{m}.{k}": v for m, row in summary["eval"].items() for k, v in row.items()
                            if isinstance(v, int | float)})
        parent.log_metrics({f"gains.{k}": v for k, v in summary["gains"].items()})  # None: not logged
        parent.log_dict(summary, "pipeline_summary.json")
        parent.log_text(results_markdown(summary), "results.md")
        convenience("the Prefect artifact", create_markdown_artifact, key="pipeline-results",
                    markdown=results_markdown(summary), description="base / RL teacher / student, and the releases")
    return summary


def summarize(results: dict[str, StageResult], timings: dict[str, float]) -> dict[str, Any]:
    """The JSON scripts read: per stage (run id, outputs, metrics, seconds), per model, the releases."""
    eval_summary = registry.get("eval").flow_module.summarize(results["eval"])
    eval_rows: dict[str, dict[str, Any]] = {}
    for m in eval_summary["models"]:
        metrics, eff = m["metrics"], m.get("efficiency", {})
        maj = next((v for k, v in sorted(metrics.items()) if k.startswith("maj@")), None)
        eval_rows[m["name"]] = {
            "architecture": m.get("architecture"), "pass@1": metrics.get("pass@1"), "maj@k": maj,
            "val_loss": (m.get("val_loss") or {}).get("loss"),
            "active_params": eff.get("active_params"), "total_params": eff.get("total_params"),
            "greedy_accuracy": metrics.get("greedy_accuracy"), "format_rate": metrics.get("format_rate"),
            "device_hours": eff.get("device_hours"), "cost_usd": eff.get("cost_usd"),
        }
    stages = {name: {"mlflow_run_id": r.mlflow_run_id, "outputs": r.outputs, "metrics": r.metrics,
                     "seconds": timings.get(name, 0.0), "job_seconds": r.seconds, "cached": r.cached}
              for name, r in results.items()}
    releases = {role: results[f"release-{role}"].outputs["release"] for role in ("teacher", "student")}
    return {"stages": stages, "eval": eval_rows, "gains": gains(eval_rows), "releases": releases,
            "report_uri": results["eval"].outputs["report"],
            "cached": all(r.cached for r in results.values()),
            "seconds": round(sum(timings.values()), 2)}


def gains(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """What the lifecycle bought, in held-out pass@1: the RL teacher over the base, the student over the
    base, the share of the teacher's gain the student keeps (None when the teacher gained nothing) and the
    student's share of the teacher's active parameters."""
    base, rl, student = (rows.get(m, {}).get("pass@1") for m in ("base", "rl", "student"))
    if None in (base, rl, student):
        return {"rl_over_base": None, "student_over_base": None, "student_kept": None, "student_params": None}
    t_params, s_params = rows["rl"].get("active_params"), rows["student"].get("active_params")
    return {"rl_over_base": rl - base, "student_over_base": student - base,
            "student_kept": (student - base) / (rl - base) if rl > base else None,
            "student_params": s_params / t_params if t_params and s_params else None}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def results_markdown(summary: dict[str, Any]) -> str:
    lines = ["| model | architecture | pass@1 | maj@k | greedy | val loss | active params | total params "
             "| cost (lineage) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["eval"].items():
        cost = "–" if row.get("cost_usd") is None else f"${row['cost_usd']:.3f}"
        lines.append(f"| {name} | {_fmt(row.get('architecture'))} | {_fmt(row['pass@1'], True)} | "
                     f"{_fmt(row['maj@k'], True)} | "
                     f"{_fmt(row['greedy_accuracy'], True)} | {_fmt(row['val_loss'])} | "
                     f"{_fmt(row['active_params'])} | {_fmt(row['total_params'])} | {cost} |")
    pre = summary["stages"]["pretrain"]["metrics"]
    cost = (f"\npretraining: {pre.get('tokens', 0):,.0f} tokens, {pre.get('device_hours', 0):.4f} device-hours, "
            f"${pre.get('cost_usd', 0):.4f}" if "tokens" in pre else "")
    g = summary["gains"]
    verdict = ""
    if g["rl_over_base"] is not None:
        verdict = (f"\nRL: {100 * g['rl_over_base']:+.1f} points of pass@1 over the base; the student: "
                   f"{100 * g['student_over_base']:+.1f} points"
                   + (f", {_fmt(g['student_kept'], True)} of the teacher's gain"
                      if g["student_kept"] is not None else "")
                   + (f", with {_fmt(g['student_params'], True)} of its active parameters"
                      if g["student_params"] is not None else ""))
    rel = "\n".join(f"- {role}: `{uri}`" for role, uri in summary["releases"].items())
    times = ", ".join(f"{name} {st['seconds']:.0f}s" for name, st in summary["stages"].items())
    return f"{chr(10).join(lines)}\n{verdict}{cost}\n\nreleases:\n{rel}\n\nstage wall time: {times}\n"


def describe(summary: dict[str, Any]) -> str:
    s = get_settings()
    return (f"\n{results_markdown(summary)}\n"
            f"evaluation report: {summary['report_uri']}\n"
            f"MLflow parent run: {summary['mlflow_run_id']}\n"
            f"browse it: `.venv/bin/moeflow up`, then open {s.mlflow_ui_url} (MLflow, experiment "
            f"'{s.experiment}') and {s.prefect_ui_url} (Prefect flow runs)\n"
            f"check a release: `.venv/bin/moeflow release verify {summary['releases']['teacher']}`")
