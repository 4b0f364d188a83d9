"""The `prep` stage: raw text + generated problems -> a published, tokenised, packed dataset.

Runs inside `moeflow-job prep`: builds the dataset in a scratch directory, publishes it atomically
(files, then the SHA-256 manifest) under the stage's content-addressed location, and logs statistics,
sample documents and a document-length histogram to the job's MLflow run.
"""

from __future__ import annotations

import shutil
from typing import Any

from components.data.config import PrepConfig
from components.data.errors import PrepError
from components.dataset.format import FORMAT_NAME
from infra import storage
from infra.contract import ConfigError, StageContext, StageOutput

Config = PrepConfig


def input_uris(cfg: PrepConfig) -> dict[str, str]:
    return {f"source{i}": s.uri for i, s in enumerate(cfg.sources)}


# The published dataset's shape, as MLflow shows a dataset's schema (components/dataset/format.py has it all).
DATASET_SCHEMA = {"format": FORMAT_NAME, "splits": {"train": "uint16/uint32 token rows (seq_len + 1)",
                                                         "val": "the same", "eval/<family>.jsonl": "held-out problems"}}


def _numeric(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(_numeric(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def run(cfg: PrepConfig, ctx: StageContext) -> StageOutput:
    from components.data import prep

    out_dir = ctx.workdir / "dataset"
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        stats = prep.prepare_dataset(cfg, out_dir)
    except PrepError as exc:  # bad input: fail fast, publish nothing
        raise ConfigError(str(exc)) from exc
    dataset_uri = storage.join_uri(ctx.output_uri, "dataset")
    storage.publish_dir(out_dir, dataset_uri, meta={"kind": "dataset", "lineage": ctx.lineage})

    metrics = _numeric({k: v for k, v in stats.items() if k != "config"})  # config values are params
    ctx.tracker.log_metrics(metrics)
    manifest = storage.read_manifest(dataset_uri)
    ctx.tracker.log_dataset(dataset_uri, manifest.digest(), context="output", schema=DATASET_SCHEMA,
                            profile={"documents": stats["documents"], "tokens": stats["tokens"]})
    ctx.tracker.log_dict(stats, "stats.json")
    hist = ctx.workdir / "doc_length_histogram.png"
    prep.plot_length_histogram(stats, hist)
    ctx.tracker.log_artifact(hist, "plots")
    ctx.tracker.log_dict(prep.sample_documents(out_dir), "samples.json")
    headline = {k: v for k, v in metrics.items() if k.startswith(("tokens", "documents", "vocab"))}
    return StageOutput(outputs={"dataset": dataset_uri}, metrics=headline, extra={"stats": stats})
