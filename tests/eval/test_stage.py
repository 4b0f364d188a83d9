"""The eval stage in-process (real store and MLflow under a temporary MOEFLOW_HOME): suite, report,
model references (registry aliases included) and lineage costs."""

from __future__ import annotations

import json

import pytest
import torch

from components.refs.lineage import lineage_cost
from components.refs.models import resolve_model_ref
from components.scoring.evaluate import evaluate
from components.tasks import load_task_file
from flows import registry
from flows.registry import stage_impl
from infra import storage
from infra.contract import ConfigError
from infra.entry import run_job
from infra.plan import job_payload

SAMPLING = {"n_samples": 2, "k_values": [1, 2], "max_new_tokens": 8, "batch_size": 4, "seed": 5}


def run_eval(config: dict) -> dict:
    plan = registry.get("eval").plan(config)
    result = run_job("eval", stage_impl("eval"), job_payload(plan, parent_run_id=None, flow_run_id=None))
    return storage.read_json(storage.join_uri(result.outputs["report"], "report.json")) | {"_result": result}


def test_report_compares_models_on_user_tasks_with_the_numbers_of_evaluate(
        module_home, make_model, publish_model, task_file, tok):
    a, b = make_model(seed=0), make_model(seed=1, hidden_size=48)
    uri_a, uri_b = publish_model(a, "a"), publish_model(b, "b")
    report = run_eval({"models": [{"uri": uri_a, "name": "small"}, {"uri": uri_b}],
                       "suite": {"task_files": [str(task_file)]}, "sampling": SAMPLING})
    default_label = f"{uri_b.split('/')[-3]}-b"  # <stage>-<key[:6]> of <store>/<stage>/<key>/model
    assert [r["name"] for r in report["rows"]] == ["small", default_label]
    assert report["suite"] == {"problems": 6, "by_source": {"tasks.jsonl": 6}, "dataset": None}
    direct = evaluate(a, tok, load_task_file(task_file), **{k: v for k, v in SAMPLING.items()})
    assert report["rows"][0]["metrics"] == direct["metrics"]
    eff = report["rows"][1]["efficiency"]
    assert eff["active_params"] > report["rows"][0]["efficiency"]["active_params"]
    md = storage.read_text(storage.join_uri(report["_result"].outputs["report"], "report.md"))
    assert "| model | pass@1 | pass@2 | maj@2 |" in md and "| small |" in md
    assert report["_result"].metrics["small/pass_at_1"] == direct["metrics"]["pass@1"]


def test_a_suite_without_problems_is_a_config_error(module_home, make_model, publish_model):
    uri = publish_model(make_model(), "a")
    with pytest.raises(ConfigError, match="suite"):
        registry.get("eval").plan({"models": [{"uri": uri}]})


def test_registry_alias_resolves_to_the_tagged_release(module_home, make_model, publish_model):
    from infra.tracking import _client

    uri = publish_model(make_model(), "rel")
    client = _client()
    client.create_registered_model("tinyflow")
    mv = client.create_model_version("tinyflow", source=uri, tags={"moeflow.model_uri": uri})
    client.set_registered_model_alias("tinyflow", "champion", mv.version)
    assert resolve_model_ref("models:/tinyflow@champion") == uri
    assert resolve_model_ref(f"models:/tinyflow/{mv.version}") == uri
    with pytest.raises(ConfigError, match="not found"):
        resolve_model_ref("models:/tinyflow@nobody")
    bare = client.create_model_version("tinyflow", source=uri)
    with pytest.raises(ConfigError, match="moeflow.model_uri"):
        resolve_model_ref(f"models:/tinyflow/{bare.version}")


def test_stage_output_root_resolves_to_its_model(module_home, make_model, publish_model):
    uri = publish_model(make_model(), "m")
    root = uri.rsplit("/", 1)[0]
    storage.write_json(storage.join_uri(root, "RESULT.json"), {"stage": "rl", "outputs": {"checkpoint": uri}})
    assert resolve_model_ref(root) == uri


def _result(root: str, stage: str, key: str, inputs: dict, metrics: dict, seconds: float) -> None:
    storage.write_json(storage.join_uri(root, "RESULT.json"), {
        "stage": stage, "outputs": {}, "metrics": metrics, "seconds": seconds,
        "lineage": {"key": key, "inputs": {n: {"uri": u, "hash": "x"} for n, u in inputs.items()}, "config": {}}})


def test_lineage_cost_adds_every_stage_once(module_home):
    store = storage.join_uri(module_home, "store")
    pre, rl, dis = (storage.join_uri(store, s, "k" + s) for s in ("pretrain", "rl", "distill"))
    _result(pre, "pretrain", "kpre", {"dataset": storage.join_uri(store, "prep", "kp", "dataset")},
            {"device_hours": 0.5, "cost_usd": 1.0}, 1800)
    _result(rl, "rl", "krl", {"checkpoint": pre + "/model"}, {}, 360)  # no ledger: 0.1 h from seconds
    _result(dis, "distill", "kdis", {"teacher": rl + "/model", "dataset": "x"}, {"device_hours": 0.05}, 180)
    cost = lineage_cost(dis + "/model", price_per_device_hour=3.0)
    assert [s["stage"] for s in cost["stages"]] == ["distill", "rl", "pretrain"]
    assert cost["device_hours"] == pytest.approx(0.5 + 0.1 + 0.05)
    assert cost["cost_usd"] == pytest.approx(1.0 + 0.3 + 0.15)
    assert cost["estimated"] is True


def test_report_table_artifact_rows_are_json(module_home, make_model, publish_model, task_file):
    from flows.eval import summarize

    report = run_eval({"models": [{"uri": publish_model(make_model(), "a")}],
                       "suite": {"task_files": [str(task_file)], "max_per_file": 2}, "sampling": SAMPLING})
    summary = summarize(report["_result"])
    json.dumps(summary)
    assert summary["table"][0]["model"] == report["rows"][0]["name"]
    assert set(summary["table"][0]) >= {"pass@1", "device-hours", "active params"}
    assert summary["models"][0]["metrics"]["pass@1"] == report["rows"][0]["metrics"]["pass@1"]


def test_a_checkpoint_of_a_running_stage_loads_with_its_datasets_tokenizer(module_home, make_model, tok, tmp_path):
    from components.data.tokenizer import save_tokenizer
    from components.refs.checkpoint import save_model
    from components.refs.models import load_model_ref

    dataset = tmp_path / "dataset"
    save_tokenizer(tok, dataset, model_max_length=256)
    out = tmp_path / "store" / "pretrain" / "k1"
    model = make_model()
    ckpt_dir = save_model(model, model.cfg, out / "checkpoints" / "step_0000010")  # no tokenizer files
    storage.write_json(str(out / "job.json"), {"stage": "pretrain", "inputs": {"dataset": str(dataset)}})
    loaded = load_model_ref(str(ckpt_dir))
    assert loaded.tokenizer_file == dataset / "tokenizer.json"
    assert loaded.tokenizer.encode("1+2").ids == tok.encode("1+2").ids
    torch.testing.assert_close(loaded.model.output_weight(), model.output_weight())
