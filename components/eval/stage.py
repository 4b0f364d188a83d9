"""The `eval` stage: models by reference in, one comparison report out (`<output>/report/`).

Runs inside `moeflow-job eval`. Every model is evaluated on the same problems with the same seeds (see
`components.scoring.evaluate`), its validation loss is taken on the dataset's val split when it shares the
dataset's tokenizer, and its efficiency (parameters, FLOPs per token, device-hours and cost of its
lineage) sits beside its quality. Published: `report.json` (rows, per-family metrics, settings),
`report.md` (the table), `samples/<model>.jsonl` (the first `keep_samples` sample records per model).
Registry references (`models:/NAME@ALIAS`) are resolved when the stage is planned, so the content hash
covers the model version that is actually evaluated.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from components.eval.config import EvalConfig
from infra import storage
from infra.contract import ConfigError, StageContext, StageOutput

Config = EvalConfig
log = logging.getLogger("moeflow.eval")


def input_uris(cfg: EvalConfig) -> dict[str, str]:
    from components.refs.lineage import lineage_dataset
    from components.refs.models import resolve_model_ref

    uris = {f"model{i}": resolve_model_ref(m.uri) for i, m in enumerate(cfg.models)}
    dataset = cfg.suite.dataset or lineage_dataset(uris["model0"])
    if dataset:
        uris["dataset"] = dataset
    for i, f in enumerate(cfg.suite.task_files):
        uris[f"tasks{i}"] = f
    if not dataset and not cfg.suite.task_files:
        raise ConfigError("eval.suite: no problems to evaluate: set suite.dataset (a prepared dataset URI) or "
                          "suite.task_files (user JSONL tasks); the first model's lineage names no dataset")
    return uris


def load_suite(cfg: EvalConfig, inputs: dict[str, str], workdir: Path) -> tuple[list[Any], dict[str, int]]:
    """The problems (dataset held-out splits, then task files) and how many came from each source."""
    from components.dataset.format import DatasetFormatError, load_dataset_meta, load_eval_split
    from components.refs.models import local_dir
    from components.tasks import Problem, TaskFileError, load_task_file, local_task_file

    problems: list[Problem] = []
    by_source: dict[str, int] = {}
    if "dataset" in inputs:
        ds = local_dir(inputs["dataset"])
        try:
            available = sorted(load_dataset_meta(ds).get("eval", {}))
            families = cfg.suite.families or available
            for fam in families:
                rows = load_eval_split(ds, fam)[: cfg.suite.max_per_family]
                problems.extend(Problem.from_dict(r) for r in rows)
                by_source[fam] = len(rows)
        except DatasetFormatError as exc:
            raise ConfigError(f"eval.suite.dataset: {exc}") from None
    for i, uri in enumerate(cfg.suite.task_files):
        path = local_task_file(uri, workdir / f"tasks{i}.jsonl", field=f"eval.suite.task_files[{i}]")
        try:
            rows = load_task_file(path)[: cfg.suite.max_per_file]
        except TaskFileError as exc:
            raise ConfigError(f"eval.suite.task_files[{i}]: {exc}") from None
        problems.extend(rows)
        by_source[Path(uri).name] = len(rows)
    if not problems:
        raise ConfigError("eval.suite: the suite holds no problems (empty splits or task files)")
    return problems, by_source


def evaluate_model(cfg: EvalConfig, name: str, uri: str, problems: list[Any], dataset_dir: Path | None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One report row (and the sample records) for the model at ``uri``."""
    from components.dataset.format import same_tokenizer
    from components.model import model_info
    from components.refs.lineage import lineage_cost
    from components.refs.models import load_model_ref
    from components.scoring.evaluate import evaluate, validation_loss

    t0 = time.time()
    lm = load_model_ref(uri)
    s = cfg.sampling
    res = evaluate(lm.model, lm.tokenizer, problems, n_samples=s.n_samples, temperature=s.temperature,
                   top_p=s.top_p, max_new_tokens=s.max_new_tokens, k_values=s.k_values, seed=s.seed,
                   greedy=s.greedy, batch_size=s.batch_size)
    val = None
    if cfg.val_loss and dataset_dir is not None:
        if same_tokenizer(dataset_dir, lm.tokenizer_file):
            val = validation_loss(lm.model, dataset_dir, "val", max_rows=cfg.val_max_rows)
        else:
            log.info("%s: tokenizer differs from the dataset's; no validation loss", name)
    info = model_info(lm.cfg)
    cost = lineage_cost(uri, price_per_device_hour=cfg.price_per_device_hour)
    row = {
        "name": name,
        "uri": uri,
        "kind": lm.kind,
        "architecture": (lm.cfg.to_hf_dict().get("architectures") or [lm.cfg.model_type])[0],
        "metrics": res["metrics"],
        "by_family": res["by_family"],
        "val_loss": val,
        "efficiency": {
            "total_params": info["total_params"], "active_params": info["active_params"],
            "flops_per_token": info["inference_flops_per_token"],
            "train_flops_per_token": info["flops_per_token"],
            "device_hours": cost["device_hours"], "cost_usd": cost["cost_usd"],
            "cost_estimated": cost["estimated"], "lineage": cost["stages"],
        },
        "seconds": time.time() - t0,
    }
    log.info("%s: pass@1 %.3f ± %.3f, greedy %.3f, format %.2f (%.1fs)", name, res["metrics"]["pass@1"],
             res["metrics"]["pass@1_stderr"], res["metrics"].get("greedy_accuracy", float("nan")),
             res["metrics"]["format_rate"], row["seconds"])
    return row, res["samples"]


def run(cfg: EvalConfig, ctx: StageContext) -> StageOutput:
    import torch

    from components.eval.report import comparison_figure, markdown_report
    from components.refs.models import local_dir
    from infra.tracking import metric_key

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inputs = ctx.inputs
    problems, by_source = load_suite(cfg, inputs, ctx.workdir)
    dataset_dir = local_dir(inputs["dataset"]) if "dataset" in inputs else None
    log.info("suite: %d problems %s", len(problems), by_source)

    out = ctx.workdir / "report"
    shutil.rmtree(out, ignore_errors=True)
    (out / "samples").mkdir(parents=True)
    rows = []
    for i, ref in enumerate(cfg.models):
        name = ref.label(i)
        row, samples = evaluate_model(cfg, name, inputs[f"model{i}"], problems, dataset_dir)
        row["ref"] = ref.uri
        rows.append(row)
        with open(out / "samples" / f"{metric_key(name).replace('/', '_')}.jsonl", "w", encoding="utf-8") as f:
            for rec in samples[: cfg.keep_samples]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    report = {
        "rows": rows,
        "settings": cfg.sampling.model_dump(mode="json"),
        "suite": {"problems": len(problems), "by_source": by_source, "dataset": inputs.get("dataset")},
    }
    markdown = markdown_report(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown)
    report_uri = storage.join_uri(ctx.output_uri, "report")
    storage.publish_dir(out, report_uri, meta={"kind": "eval-report", "lineage": ctx.lineage}, overwrite=True)

    metrics: dict[str, float] = {}
    for row in rows:
        label = metric_key(row["name"])
        for k, v in row["metrics"].items():
            metrics[f"{label}/{metric_key(k)}"] = float(v)
        if row["val_loss"]:
            metrics[f"{label}/val_loss"] = row["val_loss"]["loss"]
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict(report, "report.json")
    ctx.tracker.log_text(markdown, "report.md")
    ctx.tracker.log_figure(comparison_figure(rows), "plots/comparison.png")
    return StageOutput(outputs={"report": report_uri}, metrics=metrics, extra={"report": report})
