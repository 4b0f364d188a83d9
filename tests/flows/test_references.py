"""`latest:<stage>` references (flows/references.py) against a real local store: the newest complete output
wins, running or half-deleted runs never count, an empty store is an error naming the field (the form's
field in a flow, `--set` in the CLI), and a resolved reference plans to the very key of its URI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import registry
from flows.common import preset_config
from flows.references import resolve_references
from infra import storage
from infra.contract import RESULT_NAME, ConfigError, StageResult
from infra.plan import published_results
from infra.settings import get_settings

REPO = Path(__file__).resolve().parents[2]


def stage_run(stage: str, key: str, outputs: tuple[str, ...], tmp_path: Path, *, inputs: dict[str, str] | None = None,
              result: bool = True) -> dict[str, str]:
    """What a finished job leaves in the store: each output published (files, then MANIFEST.json), then
    RESULT.json (last, unless `result` is False: a job still running or one that died). Returns the outputs."""
    root = storage.join_uri(get_settings().store_uri, stage, key)
    uris = {}
    for name in outputs:
        src = tmp_path / stage / key / name
        src.mkdir(parents=True)
        (src / "data.json").write_text(f'{{"stage": "{stage}", "key": "{key}", "output": "{name}"}}')
        uris[name] = storage.join_uri(root, name)
        storage.publish_dir(src, uris[name])
    if result:
        lineage = {"stage": stage, "inputs": {n: {"uri": u, "hash": None} for n, u in (inputs or {}).items()}}
        storage.write_json(storage.join_uri(root, RESULT_NAME),
                           StageResult(stage=stage, outputs=uris, lineage=lineage).model_dump(mode="json"))
    return uris


def tick() -> None:
    """Manifests record their publish time to the second: the next run is published a second later."""
    time.sleep(1.05)


def test_the_newest_complete_output_wins_and_unfinished_runs_never_count(moeflow_home, tmp_path):
    old = stage_run("prep", "a0", ("dataset",), tmp_path)
    tick()
    new = stage_run("prep", "0b", ("dataset",), tmp_path)  # sorts before "a0": the time decides, not the name
    tick()
    stage_run("prep", "c1", ("dataset",), tmp_path, result=False)  # running (or died): no RESULT.json yet
    gone = stage_run("prep", "d2", ("dataset",), tmp_path)
    storage.delete_file(storage.join_uri(gone["dataset"], storage.MANIFEST_NAME))  # being deleted / unpublished
    storage.write_json(storage.join_uri(get_settings().store_uri, "prep", "e3", "job.json"), {})  # just planned

    runs = published_results("prep")
    assert [r.result.outputs["dataset"] for r in runs] == [new["dataset"], old["dataset"]]
    assert runs[0].published > runs[1].published
    resolved = resolve_references("pretrain", {"dataset": "latest:prep", "steps": 3})
    assert resolved == {"dataset": new["dataset"], "steps": 3}


def test_a_resolved_reference_plans_to_the_key_of_its_uri_and_is_logged(moeflow_home, tmp_path, caplog):
    dataset = stage_run("prep", "a0", ("dataset",), tmp_path)["dataset"]
    with caplog.at_level(logging.INFO, logger="flows.common"):
        by_ref = preset_config("pretrain", "tiny", {"steps": 5}, None)  # the tiny preset: dataset latest:prep
    by_uri = preset_config("pretrain", "tiny", {"steps": 5, "dataset": dataset}, None)
    assert by_ref.dataset == dataset
    pretrain = registry.get("pretrain")
    plan_ref = pretrain.plan(by_ref.model_dump(mode="json"))
    plan_uri = pretrain.plan(by_uri.model_dump(mode="json"))
    assert (plan_ref.key, plan_ref.output_uri, plan_ref.inputs) == (plan_uri.key, plan_uri.output_uri, plan_uri.inputs)
    assert f"dataset: latest:prep -> {dataset}" in caplog.text


def test_other_outputs_lists_and_every_stage_of_the_pipeline(moeflow_home, tmp_path):
    base = stage_run("pretrain", "p0", ("checkpoint",), tmp_path)["checkpoint"]
    teacher = stage_run("rl", "r0", ("checkpoint", "report"), tmp_path)["checkpoint"]
    distill = stage_run("distill", "s0", ("student", "traces"), tmp_path)
    cfg = preset_config("eval", "tiny", {}, None)  # base, rl, student: the newest of each stage
    assert [(m.uri, m.name) for m in cfg.models] == [(base, "base"), (teacher, "rl"), (distill["student"], "student")]
    data = resolve_references("distill", {"teacher": "latest:rl", "traces_uri": "latest:distill.traces"})
    assert data == {"teacher": teacher, "traces_uri": distill["traces"]}
    with pytest.raises(ConfigError, match=r"distill.traces_uri: latest:rl.traces — .* has no output 'traces'"):
        resolve_references("distill", {"traces_uri": "latest:rl.traces"})


def test_release_takes_the_newest_evaluation_of_the_model_it_releases(moeflow_home, tmp_path):
    teacher = stage_run("rl", "r0", ("checkpoint", "report"), tmp_path)["checkpoint"]
    other = stage_run("pretrain", "p0", ("checkpoint",), tmp_path)["checkpoint"]
    of_teacher = stage_run("eval", "e0", ("report",), tmp_path, inputs={"model0": other, "model1": teacher})
    tick()
    stage_run("eval", "e1", ("report",), tmp_path, inputs={"model0": other})  # newer, but not of the teacher
    cfg = preset_config("release", "tiny", {}, None)  # model latest:rl, eval_report latest:eval
    assert (cfg.model, cfg.eval_report, cfg.name) == (teacher, of_teacher["report"], "moeflow-teacher")
    student = stage_run("distill", "s0", ("student", "traces"), tmp_path)["student"]  # never evaluated
    with pytest.raises(ConfigError, match=rf"release.eval_report: latest:eval — no published eval output in "
                                          rf".* evaluated {student} \(release.model\); run eval on it first, or set "
                                          rf"the field `eval_report` to a URI, or override eval_report=null to "
                                          rf"release without a report"):
        preset_config("release", "tiny", {"model": "latest:distill", "eval_report": None, "name": None}, None)


def test_an_empty_store_names_the_field_the_store_and_what_to_run(moeflow_home):
    """Quick runs (the deployed flows' functions called with no parameters) before anything ran."""
    from flows.eval import eval_flow
    from flows.pretrain import pretrain_flow
    from flows.rl import rl_flow

    store = get_settings().store_uri
    with pytest.raises(ConfigError) as err:
        pretrain_flow.fn()
    assert str(err.value) == (f"pretrain.dataset: latest:prep — no published prep output in {store}; run prep "
                              "first, or set the field `dataset` to a URI")
    with pytest.raises(ConfigError, match=r"rl.model: latest:pretrain — .*; run pretrain first, or set the field "
                                          r"`model`"):
        rl_flow.fn()
    with pytest.raises(ConfigError, match=r"eval.models.0.uri: latest:pretrain — .*set the field `models`"):
        eval_flow.fn()
    with pytest.raises(ConfigError, match=r"distill.student.init: latest:pretrain — .*add the override "
                                          r"`student.init=<URI>`"):
        preset_config("distill", "tiny", {"teacher": "/somewhere"}, ["student.init=latest:pretrain"])
    with pytest.raises(ConfigError, match=r"rl.model: latest:pretrain — .*, or --set model=<URI>$"):
        resolve_references("rl", {"model": "latest:pretrain"})  # the CLI's wording
    with pytest.raises(ConfigError, match=r"pretrain.dataset: 'latest:perp': unknown stage 'perp'; .*prep, pretrain"):
        resolve_references("pretrain", {"dataset": "latest:perp"})


def test_bad_values_are_reported_before_the_store_is_read(moeflow_home):
    with pytest.raises(ConfigError, match=r"pretrain.steps"):  # not the empty store's latest:prep
        preset_config("pretrain", "tiny", {"steps": 0}, None)


def test_the_cli_resolves_before_planning_and_names_the_set_option(moeflow_home):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pretrain", "--config", "configs/tiny.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: pretrain.dataset: latest:prep — no published prep output in {get_settings().store_uri}; "
        "run prep first, or --set dataset=<URI>")


def test_the_tiny_preset_references_only_what_the_pipeline_wires_itself():
    """`moeflow pipeline` passes these fields explicit URIs (flows/pipeline.py: pipeline_flow), so its configs
    and keys never depend on what else the store holds; a reference anywhere else would."""
    from flows.pipeline import load_preset
    from flows.references import find_references

    cfg = load_preset("tiny")
    found = {f"{stage}.{path}": ref for stage, section in cfg.items() for path, ref in find_references(section)}
    assert found == {"pretrain.dataset": "latest:prep", "rl.model": "latest:pretrain", "distill.teacher": "latest:rl",
                     "eval.models.0.uri": "latest:pretrain", "eval.models.1.uri": "latest:rl",
                     "eval.models.2.uri": "latest:distill", "release.model": "latest:rl",
                     "release.eval_report": "latest:eval"}
