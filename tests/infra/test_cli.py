"""The CLI's own behaviour: doctor, model info, override parsing, and errors that name what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.configfile import apply_overrides, load_yaml
from infra.contract import ConfigError

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_doctor_checks_services_and_masks_secrets(moeflow_home, s3_env):
    secret = "do-not-print-this-secret"
    # a generous service timeout: creating the SQLite tracking store took over the default 10 s on an
    # oversubscribed machine (a fresh-clone `make test` beside two pipeline runs); this test is not a timer
    ok = cli("doctor", "--json", env={"MOEFLOW_STORE_URI": s3_env, "MOEFLOW_S3__SECRET_ACCESS_KEY": secret,
                                      "MOEFLOW_SERVICE_TIMEOUT_S": "120"})
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert {c["name"]: c["ok"] for c in report["checks"]} == {"store": True, "tracking": True, "prefect": True}
    assert report["settings"]["s3"]["secret_access_key"] == "***"
    assert secret not in ok.stdout + ok.stderr

    down = cli("doctor", "--json", env={"MOEFLOW_STORE_URI": "s3://nowhere/x",
                                        "MOEFLOW_S3__ENDPOINT_URL": "http://127.0.0.1:9",
                                        "MOEFLOW_S3__MAX_ATTEMPTS": "1"})
    assert down.returncode == 1
    checks = {c["name"]: c for c in json.loads(down.stdout.strip().splitlines()[-1])["checks"]}
    assert checks["store"]["ok"] is False and checks["tracking"]["ok"] is True


def test_model_info_reproduces_deepseek_v3_sizes():
    proc = cli("model", "info", "--config", "configs/models/deepseek-v3.yaml", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 665e9 < info["total_params"] < 675e9
    assert 36.5e9 < info["active_params"] < 38e9


def test_model_info_reads_the_model_of_a_preset():
    proc = cli("model", "info", "--config", "configs/tiny.yaml", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["active_params"] > 0


def test_overrides_parse_yaml_values_and_reject_bad_syntax():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d.e=true", "f=s3://x/y"])
    assert data == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": True}, "f": "s3://x/y"}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="'a' is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prep:\n  seed: 1\n  tokenizer: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: invalid YAML"):
        load_yaml(bad)


def test_unknown_config_field_is_named_and_exits_non_zero(moeflow_home):
    proc = cli("prep", "--config", "configs/tiny.yaml", "--set", "tokenizr.vocab_size=10")
    assert proc.returncode == 3
    assert "prep.tokenizr" in proc.stderr and "Traceback" not in proc.stderr
