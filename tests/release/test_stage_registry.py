"""The release stage in-process (real store and MLflow under a temporary MOEFLOW_HOME): publish, verify,
register as `candidate`, promote to `champion` only through the gate; the registry contract the evaluation
stage resolves; S3; config errors; the flow's summary."""

from __future__ import annotations

import json

import pytest

from components.refs.models import resolve_model_ref
from components.release import registry
from components.release.config import GateConfig
from components.release.gate import evaluate_gate
from components.release.verify import verify_release
from flows import registry as stage_registry
from flows.registry import stage_impl
from flows.release import describe, summarize
from infra import storage
from infra.contract import ConfigError
from infra.entry import run_job
from infra.plan import job_payload

pytestmark = pytest.mark.usefixtures("shared_tracking")


def release(config: dict):
    plan = stage_registry.get("release").plan(config)
    return run_job("release", stage_impl("release"), job_payload(plan, parent_run_id=None, flow_run_id="flow-123"))


def aliases(name: str) -> dict[str, str]:
    from infra.tracking import _client

    return {a: str(v) for a, v in (_client().get_registered_model(name).aliases or {}).items()}


def test_first_release_is_registered_as_candidate_and_champion(moeflow_home, make_model, publish_model,
                                                              publish_report):
    model_uri = publish_model(make_model(seed=1))
    report = publish_report(model_uri, {"pass@1": 0.5, "pass@1_stderr": 0.1, "format_rate": 0.9})
    result = release({"model": model_uri, "eval_report": report, "name": "tiny-a",
                      "gate": {"min": {"pass@1": 0.25}}, "license": {"holder": "ACME Labs", "year": 2030}})
    uri = result.outputs["release"]
    assert result.metrics["gate_passed"] == 1.0 and result.metrics["promoted"] == 1.0
    assert result.metrics["model_version"] == 1.0 and result.metrics["eval/pass_at_1"] == 0.5
    assert aliases("tiny-a") == {"candidate": "1", "champion": "1"}
    info = registry.version_info("tiny-a", "1")
    manifest = storage.read_manifest(uri)
    assert info["model_uri"] == uri and info["release_sha256"] == manifest.digest()
    assert info["metrics"]["pass@1"] == 0.5 and info["metrics"]["val_loss"] == 2.5
    assert resolve_model_ref("models:/tiny-a@champion") == uri  # the evaluation stage's view of the registry
    from infra.tracking import _client

    mv = _client().get_model_version("tiny-a", "1")
    assert mv.source.startswith("models:/m-") and mv.run_id == result.mlflow_run_id  # the logged model
    assert _client().get_run(result.mlflow_run_id).info.run_name == f"release {mv.name}"  # named for its release
    assert json.loads(mv.tags["moeflow.gate"])["promoted"] is True
    card = storage.read_text(storage.join_uri(uri, "README.md"))
    assert "The gate passed, so this release was made the `champion`" in card
    assert f"MLflow run `{result.mlflow_run_id}`" in card and "Prefect flow run `flow-123`" in card
    assert "Copyright (c) 2030 ACME Labs" in storage.read_text(storage.join_uri(uri, "LICENSE"))
    assert manifest.meta["lineage"]["inputs"]["model"]["uri"] == model_uri
    assert verify_release(uri)["ok"]
    summary = summarize(result)
    assert summary["version"] == 1 and summary["gate"]["promoted"] is True and summary["release_uri"] == uri
    assert "promoted to champion" in describe(summary)


def test_worse_than_champion_stays_candidate(moeflow_home, make_model, publish_model):
    model_uri = publish_model(make_model(seed=2))
    release({"model": model_uri, "name": "tiny-b", "metrics": {"pass@1": 0.5}})
    worse = release({"model": model_uri, "name": "tiny-b", "metrics": {"pass@1": 0.3}})
    assert worse.metrics["gate_passed"] == 0.0 and worse.metrics["promoted"] == 0.0
    assert worse.metrics["champion_version"] == 1.0
    assert aliases("tiny-b") == {"candidate": "2", "champion": "1"}
    gate = storage.read_manifest(worse.outputs["release"]).meta["gate"]
    assert gate["champion"]["version"] == "1" and gate["champion"]["metrics"]["pass_at_1"] == 0.5
    assert gate["reasons"] == ["pass_at_1 = 0.3 < champion v1's 0.5"]
    card = storage.read_text(storage.join_uri(worse.outputs["release"], "README.md"))
    assert "The gate failed, so the `champion` alias was left where it was" in card
    assert "Champion at release time: version 1" in card and ": pass_at_1 0.5." in card
    assert "gate failed (champion: version 1), champion unchanged" in describe(summarize(worse))


def test_threshold_failure_leaves_the_champion(moeflow_home, make_model, publish_model):
    model_uri = publish_model(make_model(seed=3, dense=True))
    release({"model": model_uri, "name": "tiny-c", "metrics": {"pass@1": 0.5, "format_rate": 0.9}})
    better_but_sloppy = release({"model": model_uri, "name": "tiny-c", "metrics": {"pass@1": 0.8, "format_rate": 0.2},
                                 "gate": {"min": {"format_rate": 0.5}}})
    assert better_but_sloppy.metrics["promoted"] == 0.0
    assert aliases("tiny-c") == {"candidate": "2", "champion": "1"}
    gate = storage.read_manifest(better_but_sloppy.outputs["release"]).meta["gate"]
    assert gate["reasons"] == ["format_rate = 0.2 < 0.5"]


def test_better_release_is_promoted(moeflow_home, make_model, publish_model):
    teacher_uri = publish_model(make_model(seed=4))
    student_uri = publish_model(make_model(seed=5, dense=True))
    release({"model": teacher_uri, "name": "tiny-d", "metrics": {"pass@1": 0.5}})
    better = release({"model": student_uri, "name": "tiny-d", "metrics": {"pass@1": 0.6}})
    assert better.metrics["promoted"] == 1.0
    assert aliases("tiny-d") == {"candidate": "2", "champion": "2"}
    assert resolve_model_ref("models:/tiny-d@champion") == better.outputs["release"]


def test_unevaluated_release_is_never_promoted(moeflow_home, make_model, publish_model):
    result = release({"model": publish_model(make_model(seed=6)), "name": "tiny-e"})
    assert result.metrics["gate_passed"] == 0.0
    assert aliases("tiny-e") == {"candidate": "1"}


def test_student_release_on_s3(s3_env, patch_env, make_model, publish_model, publish_report):
    with patch_env(MOEFLOW_STORE_URI=s3_env):
        model_uri = publish_model(make_model(seed=7, dense=True))
        assert model_uri.startswith("s3://")
        report = publish_report(model_uri, {"pass@1": 0.25})
        result = release({"model": model_uri, "eval_report": report, "name": "tiny-s3"})
        uri = result.outputs["release"]
        assert uri.startswith(f"{s3_env}/release/")
        assert registry.version_info("tiny-s3", "1")["model_uri"] == uri
        report = verify_release(uri)
        assert report["ok"], [c for c in report["checks"] if not c["ok"]]
        card = storage.read_text(storage.join_uri(uri, "README.md"))
        assert "| pass@1 | 0.25 | report |" in card and "dense" in card


def test_config_errors_name_the_field(moeflow_home, make_model, publish_model, publish_report):
    with pytest.raises(ConfigError, match="release.model"):
        stage_registry.get("release").plan({})
    with pytest.raises(ConfigError, match="license.holder"):
        stage_registry.get("release").plan({"model": "x", "license": {"holder": "a\nb"}})
    model_uri = publish_model(make_model(seed=8))
    other = publish_model(make_model(seed=9), tag="other")
    report = publish_report(other, {"pass@1": 0.5}, name="other")
    with pytest.raises(ConfigError, match="does not evaluate the released model"):
        release({"model": model_uri, "eval_report": report, "name": "tiny-f"})
    with pytest.raises(ConfigError, match="no row 'nope'"):
        release({"model": model_uri, "eval_report": report, "eval_model": "nope", "name": "tiny-f"})


@pytest.mark.parametrize(("metrics", "champion", "passed"), [
    ({"pass@1": 0.5}, None, True),
    ({"pass@1": 0.5}, {"version": "3", "metrics": {"pass@1": 0.5}}, True),
    ({"pass@1": 0.49}, {"version": "3", "metrics": {"pass@1": 0.5}}, False),
    ({"pass@1": 0.49}, {"version": "3", "metrics": {}}, False),
    ({}, None, False),
])
def test_gate_compares_with_the_champion(metrics, champion, passed):
    assert evaluate_gate(GateConfig(), metrics, champion)["passed"] is passed


def test_gate_thresholds_directions_and_tolerance():
    gate = GateConfig(min={"pass@1": 0.3}, max={"val_loss": 3.0}, compare={"val_loss": "lower"}, tolerance=0.1)
    champ = {"version": "1", "metrics": {"val_loss": 2.0}}
    assert evaluate_gate(gate, {"pass@1": 0.3, "val_loss": 2.1}, champ)["passed"]
    d = evaluate_gate(gate, {"pass@1": 0.2, "val_loss": 2.2}, champ)
    assert not d["passed"] and d["reasons"] == ["pass_at_1 = 0.2 < 0.3", "val_loss = 2.2 > champion v1's 2 + 0.1"]
    assert not evaluate_gate(gate, {"pass@1": 0.4, "val_loss": 3.5}, None)["passed"]
    assert not evaluate_gate(gate, {"pass@1": float("nan"), "val_loss": 1.0}, None)["passed"]


def test_champion_promoted_meanwhile_is_rechecked_before_promotion(moeflow_home, make_model, publish_model,
                                                                   monkeypatch):
    model_uri = publish_model(make_model(seed=10))
    release({"model": model_uri, "name": "tiny-g", "metrics": {"pass@1": 0.9}})
    real = registry.current_champion
    calls = []

    def stale_then_real(name, **kw):  # the first read misses v1, as if it were promoted during the build
        calls.append(name)
        return None if len(calls) == 1 else real(name, **kw)

    monkeypatch.setattr(registry, "current_champion", stale_then_real)
    late = release({"model": model_uri, "name": "tiny-g", "metrics": {"pass@1": 0.6}})
    assert len(calls) == 2 and late.metrics["gate_passed"] == 1.0 and late.metrics["promoted"] == 0.0
    assert aliases("tiny-g") == {"candidate": "2", "champion": "1"}
    from infra.tracking import _client

    tag = json.loads(_client().get_model_version("tiny-g", "2").tags["moeflow.gate"])
    assert tag["promoted"] is False and tag["reasons"] == ["pass_at_1 = 0.6 < champion v1's 0.9"]
    assert "not promoted against the champion of that moment: pass_at_1 = 0.6" in describe(summarize(late))


def test_unregistered_release_touches_no_registry(moeflow_home, make_model, publish_model):
    from mlflow.exceptions import MlflowException

    result = release({"model": publish_model(make_model(seed=11)), "name": "tiny-h", "register_model": False,
                      "metrics": {"pass@1": 0.5}})
    assert "model_version" not in result.metrics and result.metrics["promoted"] == 0.0
    assert verify_release(result.outputs["release"])["ok"]
    with pytest.raises(MlflowException):
        aliases("tiny-h")
