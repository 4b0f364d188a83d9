"""Settings: environment over YAML over embedded defaults; secrets never shown."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.settings import Settings, get_settings


def test_defaults_live_under_home(moeflow_home):
    s = get_settings()
    assert s.store_uri == f"{moeflow_home}/store"
    assert s.tracking_uri == f"sqlite:///{moeflow_home}/mlflow.db"
    assert s.launcher == "local"


def test_environment_overrides_yaml(tmp_path, patch_env, moeflow_home):
    cfg = tmp_path / "moeflow.yaml"
    cfg.write_text("store_uri: s3://from-yaml/x\nlauncher: kubernetes\ns3:\n  region: eu-west-1\n")
    with patch_env(MOEFLOW_CONFIG=str(cfg), MOEFLOW_STORE_URI="s3://from-env/y"):
        s = get_settings()
        assert s.store_uri == "s3://from-env/y"
        assert s.launcher == "kubernetes"
        assert s.s3.region == "eu-west-1"


def test_nested_env_and_bad_value_names_the_field(patch_env, moeflow_home):
    with patch_env(MOEFLOW_S3__MAX_ATTEMPTS="3"):
        assert get_settings().s3.max_attempts == 3
    with patch_env(MOEFLOW_LAUNCHER="slurm"):
        with pytest.raises(ValidationError, match="launcher"):
            Settings()


def test_secrets_are_masked_everywhere(patch_env, moeflow_home):
    secret = "sup3r-s3cret-value"
    with patch_env(MOEFLOW_S3__SECRET_ACCESS_KEY=secret, MOEFLOW_S3__ACCESS_KEY_ID="AKIAEXAMPLE"):
        s = get_settings()
        assert s.s3.secret_access_key.get_secret_value() == secret
        assert secret not in repr(s) and secret not in str(s)
        assert secret not in str(s.masked())
        assert s.masked()["s3"]["secret_access_key"] == "***"
