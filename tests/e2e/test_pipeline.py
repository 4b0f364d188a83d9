"""The tiny pipeline end to end, exactly as `make demo` runs it (`moeflow pipeline --preset tiny
--json`): real Prefect (ephemeral API), real job subprocesses, MLflow on SQLite, the local store. Then
the releases are verified against transformers, a re-run finds every stage done, a stage whose result
is gone is redone without redoing what came before it, and both UIs show the runs in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["prep", "pretrain", "rl", "distill", "eval", "release-teacher", "release-student"]


def moeflow(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEFLOW_", "PREFECT_API_URL"))}
    env["MOEFLOW_HOME"] = str(home)
    t0 = time.time()
    proc = moeflow("pipeline", "--preset", "tiny", "--json", env=env, timeout=1800)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"home": home, "env": env, "summary": summary, "stderr": proc.stderr, "seconds": seconds}


def test_summary_json_has_what_scripts_read(demo):
    s = demo["summary"]
    assert s["mlflow_run_id"]
    assert list(s["stages"]) == STAGES
    for name, stage in s["stages"].items():
        assert stage["mlflow_run_id"], name
        assert stage["outputs"] and isinstance(stage["metrics"], dict) and stage["seconds"] > 0, name
    for model in ("base", "rl", "student"):
        row = s["eval"][model]
        for key in ("pass@1", "maj@k", "val_loss", "active_params"):
            assert row[key] is not None, (model, key)
    assert set(s["releases"]) == {"teacher", "student"}


def test_rl_beats_the_base_and_the_student_stays_close_to_the_teacher(demo):
    """What the demo is for (issues 6 and 8), on all 200 held-out problems x 8 samples (standard error ~2
    points).

    The pipeline is seeded end to end (measured: base 31.8%, RL 54.1%, student 57.9%); the margins are what
    another CPU's last bits could move (two RL runs that differ only in thread count ended 3 points apart),
    well inside what a broken stage would cost (an RL step that unlearns, a student that never learns to
    read)."""
    ev, g = demo["summary"]["eval"], demo["summary"]["gains"]
    assert g["rl_over_base"] >= 0.12, ev
    assert ev["student"]["pass@1"] >= ev["rl"]["pass@1"] - 0.05, ev
    assert "points of pass@1 over the base" in demo["stderr"]


def test_the_student_is_dense_and_at_most_half_the_teacher(demo):
    ev = demo["summary"]["eval"]
    assert ev["student"]["active_params"] <= ev["rl"]["active_params"] / 2, ev
    assert ev["student"]["total_params"] == ev["student"]["active_params"], ev  # every layer dense


def test_output_is_clean_and_ends_with_a_summary(demo):
    err = demo["stderr"]
    assert "Traceback" not in err
    assert not [line for line in err.splitlines() if "Warning" in line or "WARNING" in line], err[-3000:]
    assert "moeflow up" in err and "release verify" in err


def test_each_stage_is_a_child_run_of_the_pipeline_run(demo):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{demo['home']}/mlflow.db")
    parent = demo["summary"]["mlflow_run_id"]
    for name, stage in demo["summary"]["stages"].items():
        run = client.get_run(stage["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent, name
        assert run.info.status == "FINISHED", name
    assert client.get_run(parent).data.tags.get("prefect.flow_run_id")
    logged = client.get_run(parent).data.metrics
    assert logged["gains.rl_over_base"] == pytest.approx(demo["summary"]["gains"]["rl_over_base"])


def test_releases_verify_and_a_changed_byte_fails(demo, tmp_path):
    for role, uri in demo["summary"]["releases"].items():
        ok = moeflow("release", "verify", uri, "--json", env=demo["env"])
        assert ok.returncode == 0, (role, ok.stderr[-3000:])
        assert json.loads(ok.stdout.strip().splitlines()[-1])["ok"] is True
    tampered = tmp_path / "tampered"
    shutil.copytree(demo["summary"]["releases"]["teacher"], tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = moeflow("release", "verify", str(tampered), env=demo["env"])
    assert bad.returncode != 0
    assert "model.safetensors" in bad.stderr


def test_rerun_redoes_only_what_is_missing_then_nothing(demo):
    student_release = demo["summary"]["stages"]["release-student"]["outputs"]["release"]
    result = Path(student_release).parent / "RESULT.json"
    result.unlink()  # as if the last stage had failed
    again = moeflow("pipeline", "--preset", "tiny", "--json", env=demo["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads(again.stdout.strip().splitlines()[-1])["stages"]
    assert [n for n, st in stages.items() if not st["cached"]] == ["release-student"]

    t0 = time.time()
    third = moeflow("pipeline", "--preset", "tiny", "--json", env=demo["env"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(third.stdout.strip().splitlines()[-1])["cached"] is True
    assert time.time() - t0 < 0.2 * demo["seconds"]


def _dom(url: str, profile: Path) -> str:
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                    "(`make test` installs it when it runs as root)")
def test_both_uis_show_the_demo_runs(demo, tmp_path, free_port):
    from mlflow import MlflowClient

    from infra.local_services import LocalServices
    from infra.settings import Settings

    settings = Settings(home=demo["home"])
    exp = MlflowClient(tracking_uri=settings.tracking_uri).get_experiment_by_name(settings.experiment)
    env_backup = os.environ.get("PREFECT_API_URL")
    # auth=False: a DOM dump cannot type the Prefect login (tests/reliability/test_prefect_auth.py checks it)
    with LocalServices(settings, prefect_port=free_port(), mlflow_port=free_port(),
                       log_dir=tmp_path / "logs", auth=False) as ui:
        mlflow_dom = _dom(f"{ui.mlflow_url}/#/experiments/{exp.experiment_id}/runs", tmp_path / "p1")
        prefect_dom = _dom(f"{ui.prefect_url}/runs", tmp_path / "p2")
    if env_backup is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = env_backup
    assert "pipeline" in mlflow_dom, mlflow_dom[-2000:]  # the parent run (its stage runs nest under it)
    assert "pipeline" in prefect_dom, prefect_dom[-2000:]
