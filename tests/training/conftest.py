"""Fixtures for the pretraining tests: a micro dataset (real prep, ~1 s), a smaller-than-tiny model, and
helpers that run the trainer in-process or as the real job (`python -m flows.job pretrain`).

Every run here uses one CPU thread per process: on shared 2-core machines a second thread is slower.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra import storage

REPO = Path(__file__).resolve().parents[2]

# Smaller than the tiny preset: 2 layers (1 dense, 1 MoE with 8 experts top-2 in 2 groups), one MTP module.
MICRO_MODEL: dict[str, Any] = {
    "preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 8, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "max_position_embeddings": 64,
}
MICRO_PREP: dict[str, Any] = {
    "generators": {"tasks": {"n_per_family": 150}, "generic_text": {"n_docs": 100}},
    "eval": {"n_per_family": 5}, "tokenizer": {"vocab_size": 300}, "packing": {"seq_len": 32},
    "val_fraction": 0.05, "seed": 0,
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def micro_config(dataset: str, **over: Any) -> dict[str, Any]:
    """A pretraining config that trains in well under a second per few steps."""
    base = {
        "dataset": dataset, "model": dict(MICRO_MODEL), "steps": 12, "batch_size": 8, "micro_batch_size": 4,
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 3},
        "checkpoint": {"every": 4, "keep": 2}, "eval": {"every": 6, "max_rows": 16},
        "metrics": {"log_every": 4}, "deterministic": True, "threads": 1,
    }
    return merge(base, over)


@pytest.fixture(scope="session")
def micro_dataset(tmp_path_factory) -> str:
    """URI of a published micro dataset (real prep: ~8k training tokens in rows of 33)."""
    from components.data.config import PrepConfig
    from components.data.prep import prepare_dataset

    root = tmp_path_factory.mktemp("micro-dataset")
    prepare_dataset(PrepConfig.model_validate(MICRO_PREP), root / "build", progress=False)
    uri = str(root / "published")
    storage.publish_dir(root / "build", uri, meta={"kind": "dataset"})
    return uri


@pytest.fixture(scope="package")
def training_home(tmp_path_factory) -> str:
    """One MOEFLOW_HOME (MLflow database, caches) for all the pretraining tests: creating MLflow's SQLite
    schema takes seconds, so it is done once, not per test."""
    from tests.conftest import patched_env

    home = tmp_path_factory.mktemp("training-home")
    with patched_env(MOEFLOW_HOME=str(home), MOEFLOW_STORE_URI=None):
        yield str(home)


@pytest.fixture
def store(training_home, tmp_path) -> str:
    """A fresh store for this test (MOEFLOW_STORE_URI), with the package's shared home."""
    from tests.conftest import patched_env

    uri = str(tmp_path / "store")
    with patched_env(MOEFLOW_STORE_URI=uri):
        yield uri


def run_in_process(config: dict[str, Any], output_uri: str, workdir: Path, tracker=None) -> dict[str, Any]:
    """Train with the stage's Trainer in this process (rank 0 of 1) and return its result dict."""
    from components.training.config import PretrainConfig
    from components.training.trainer import Trainer
    from infra.contract import NullTracker, StageContext

    cfg = PretrainConfig.model_validate(config)
    ctx = StageContext(stage="pretrain", output_uri=output_uri, workdir=workdir, tracker=tracker or NullTracker(),
                       lineage={"key": "test"})
    return Trainer(cfg, ctx).train()


def write_job(config: dict[str, Any]):
    """Plan the stage and write its job config exactly as `flows.common.run_stage` does -> (plan, spec)."""
    from flows import registry
    from infra.contract import JobSpec
    from infra.plan import job_payload

    plan = registry.get("pretrain").plan(config)
    storage.write_json(plan.job_config_uri, job_payload(plan, parent_run_id=None, flow_run_id=None))
    cfg_resources = config.get("resources", {})
    from infra.contract import Resources

    spec = JobSpec(stage="pretrain", name=plan.job_name, config_uri=plan.job_config_uri,
                   result_uri=plan.result_uri, resources=Resources(**cfg_resources))
    return plan, spec


def job_command(config_uri: str) -> list[str]:
    return [sys.executable, "-m", "flows.job", "pretrain", "--config", config_uri]


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_job(config_uri: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(config_uri), cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=timeout)
