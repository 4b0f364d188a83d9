"""The rl stage in-process (real store and MLflow under a temporary MOEFLOW_HOME): R1-Zero and R1 runs,
what they publish and log, rejection-sampled traces, resume after a crash, and config errors."""

from __future__ import annotations

import json

import pytest

from components.rl import trainer as trainer_mod
from components.tasks import verify
from flows import registry
from flows.registry import stage_impl
from infra import storage
from infra.contract import ConfigError
from infra.entry import run_job
from infra.plan import cached_result, job_payload
from infra.settings import get_settings

EASY = {"arithmetic": {"min_operands": 2, "max_operands": 2, "max_value": 6}}


@pytest.fixture
def inputs(moeflow_home, tiny_base) -> dict[str, str]:
    """The tiny base and its dataset, published in this test's store (the stage reads published inputs)."""
    base = storage.join_uri(get_settings().store_uri, "fixtures")
    model, dataset = storage.join_uri(base, "model"), storage.join_uri(base, "dataset")
    storage.publish_dir(tiny_base.model_dir, model, meta={"kind": "model"})
    storage.publish_dir(tiny_base.dataset_dir, dataset, meta={"kind": "dataset"})
    return {"model": model, "dataset": dataset}


def config(inputs: dict[str, str], **over) -> dict:
    cfg = {
        **inputs, "threads": 1, "seed": 1,
        "tasks": {"n_prompts": 40, "knobs": EASY},
        "rewards": {"max_completion_len": 24, "overlong_cache_len": 4},
        "grpo": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "optim": {"lr": 3e-4},
                 "schedule": {"kind": "constant", "warmup_steps": 1}},
        "cold_start": {"n_examples": 8, "sft": {"seq_len": 64, "batch_size": 4, "max_steps": 2}},
        "eval": {"n_problems": 12, "n_samples": 2, "max_new_tokens": 24, "batch_size": 12},
        "samples": {"every": 2, "n": 2}, "checkpoint": {"every": 2, "keep": 1}, "log_every": 1,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def run_rl(cfg: dict):
    plan = registry.get("rl").plan(cfg)
    return plan, run_job("rl", stage_impl("rl"), job_payload(plan, parent_run_id=None, flow_run_id=None))


def test_r1_run_publishes_policy_report_samples_and_traces(inputs, tiny_base):
    from components.refs.checkpoint import load_model
    from infra.tracking import _client

    cfg = config(inputs, recipe="r1", grpo={"beta": 0.05, "dynamic_sampling": True, "max_sampling_rounds": 2},
                 rejection={"enabled": True, "n_problems": 6, "n_samples": 4})
    plan, result = run_rl(cfg)
    assert set(result.outputs) == {"checkpoint", "report", "cold_start", "traces"}
    m = result.metrics
    for key in ("reward_start", "reward_end", "accuracy_start", "accuracy_end", "accuracy_cold_start"):
        assert 0.0 <= m[key] <= 1.1, key
    assert m["steps"] == 4 and m["traces"] >= 0

    model, _ = load_model(result.outputs["checkpoint"])
    assert model.cfg.vocab_size > 0
    load_model(result.outputs["cold_start"])
    report = result.outputs["report"]
    summary = storage.read_json(storage.join_uri(report, "summary.json"))
    assert [e["label"] for e in summary["evals"]] == ["base", "cold start", "final"]
    assert summary["metrics"]["accuracy_end"] == summary["evals"][-1]["pass@1"] == m["accuracy_end"]
    assert len(summary["reward_curve"]["reward"]) == 4
    history = storage.read_json(storage.join_uri(report, "history.json"))
    for key in ("reward/total", "reward/total_std", "reward/accuracy", "reward/accuracy_std", "reward/format",
                "reward/overlong", "reward/steps", "accuracy", "response_length", "kl", "clip_fraction", "entropy",
                "groups/dropped", "grad_norm"):
        assert all(key in row for row in history), key
    assert any(row["kl"] > 0 for row in history[1:]), "beta > 0: the policy moves away from its reference"
    samples = storage.read_json(storage.join_uri(report, "samples.json"))
    assert sorted({r["step"] for r in samples}) == [1, 2, 4]
    assert {"question", "completion", "answer", "reward", "correct"} <= set(samples[0])
    png = storage.read_bytes(storage.join_uri(report, "reward_curve.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    traces = [json.loads(x) for x in
              storage.read_text(storage.join_uri(result.outputs["traces"], "traces.jsonl")).splitlines()]
    stats = storage.read_json(storage.join_uri(result.outputs["traces"], "stats.json"))
    assert len(traces) == m["traces"] == stats["kept"] and stats["samples"] == 6 * 4
    eval_ids = {json.loads(x)["id"] for x in
                (tiny_base.dataset_dir / "eval" / "arithmetic.jsonl").read_text().splitlines()}
    by_id = {p.id: p for p in tiny_base.problems()}
    for t in traces:  # fresh problems (never held-out ones), verified correct
        assert t["id"] not in eval_ids and verify(by_id[t["id"]], t["completion"]).correct

    client = _client()
    steps = [x.step for x in client.get_metric_history(result.mlflow_run_id, "reward/total")]
    assert steps == [1, 2, 3, 4]
    assert [x.step for x in client.get_metric_history(result.mlflow_run_id, "eval/pass_at_1")] == [0, 0, 4]
    plots = [a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")]
    assert plots == ["plots/reward_curve.png"]
    tables = {a.path for a in client.list_artifacts(result.mlflow_run_id, "samples")}
    assert {"samples/samples.json", "samples/step_00001.json", "samples/step_00004.json"} <= tables
    assert cached_result(plan) is not None  # the same config again is a cache hit


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped-rollouts"])
def test_a_crashed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(inputs, monkeypatch, overlap):
    """Overlapped rollouts too: the runner drains the pipeline before each checkpoint, so the resumed run
    samples from the same weights as the uninterrupted one."""
    _, straight = run_rl(config(inputs, grpo={"overlap_rollout": overlap}))
    straight_curve = storage.read_json(storage.join_uri(straight.outputs["report"], "history.json"))

    cfg = config(inputs, log_every=2, grpo={"overlap_rollout": overlap})  # the same run, another output
    original = trainer_mod.GRPOTrainer.train_step

    def crash_before_step_3(self, *args, **kwargs):
        if self.step == 2:
            raise RuntimeError("node lost")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.GRPOTrainer, "train_step", crash_before_step_3)
    with pytest.raises(RuntimeError, match="node lost"):
        run_rl(cfg)
    monkeypatch.setattr(trainer_mod.GRPOTrainer, "train_step", original)
    _, resumed = run_rl(cfg)  # what a retried job does: the same config, the same output location
    assert resumed.metrics["resumed_from_step"] == 2
    curve = storage.read_json(storage.join_uri(resumed.outputs["report"], "history.json"))
    assert [h["reward/total"] for h in curve] == [h["reward/total"] for h in straight_curve]
    assert resumed.metrics["accuracy_start"] == straight.metrics["accuracy_start"]
    assert resumed.metrics["accuracy_end"] == straight.metrics["accuracy_end"]


def test_config_errors_name_the_field(inputs):
    with pytest.raises(ConfigError, match=r"rl\.model"):
        registry.get("rl").plan({"dataset": inputs["dataset"]})
    with pytest.raises(ConfigError, match=r"rl\.tasks\.families.*unknown task families \['algebra'\]"):
        registry.get("rl").plan(config(inputs, tasks={"families": ["algebra"], "knobs": {}}))
    with pytest.raises(ConfigError, match=r"rl\.tasks.*max_valu"):
        registry.get("rl").plan(config(inputs, tasks={"knobs": {"arithmetic": {"max_valu": 3}}}))
    with pytest.raises(ConfigError, match=r"rl\.grpo\.aggregation"):
        registry.get("rl").plan(config(inputs, grpo={"aggregation": "sum"}))
    with pytest.raises(ConfigError, match=r"rl\.tasks\.n_prompts"):  # more prompts than the easy family has
        run_rl(config(inputs, tasks={"n_prompts": 500}))
