"""Shared fixtures for every test.

- `moeflow_home`: a temporary MOEFLOW_HOME (settings re-read), so no test touches the repo's `.moeflow`.
- `s3_server` (session): moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL.
- `s3_env`: points moeflow's settings at `s3_server` with dummy credentials, creates a fresh bucket and
  yields `s3://<bucket>/base`; uses `moeflow_home` too.
- `patch_env`: the `patched_env(**vars)` context manager below (set/unset variables, reload settings).
- `store_base`: parametrized ["local", "s3"]; yields a base URI in a temporary directory or in a fresh
  bucket, and sets MOEFLOW_STORE_URI to it. A test that takes it runs once per backend.

Each fixture that changes the environment restores it afterwards and clears `get_settings`' cache and
the storage clients both when it starts and when it ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process Prefect logs to the console at interpreter exit, after pytest closed its streams.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

S3_REGION = "us-east-1"
S3_KEY = "testing"  # moto accepts any credentials


def reload_settings() -> None:
    """Make the next `get_settings()` re-read the environment and drop cached S3 clients."""
    from infra.settings import get_settings
    from infra.storage import reset_clients

    get_settings.cache_clear()
    reset_clients()


@contextmanager
def patched_env(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables; restore them and reload settings on exit."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_settings()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_settings()


@pytest.fixture
def patch_env():
    """`with patch_env(MOEFLOW_S3__MAX_ATTEMPTS="3"): ...` — env changes scoped to the block."""
    return patched_env


@pytest.fixture
def moeflow_home(tmp_path_factory) -> Iterator[str]:
    """A fresh MOEFLOW_HOME directory (its path as a string)."""
    home = tmp_path_factory.mktemp("moeflow-home")
    with patched_env(MOEFLOW_HOME=str(home), MOEFLOW_STORE_URI=None):
        yield str(home)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of moto's S3 server, running in a thread on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, moeflow_home: str) -> Iterator[str]:
    """Settings pointed at moto with a new empty bucket; yields `s3://<bucket>/base`."""
    import boto3
    from botocore.config import Config

    env = {
        "MOEFLOW_S3__ENDPOINT_URL": s3_server,
        "MOEFLOW_S3__REGION": S3_REGION,
        "MOEFLOW_S3__ACCESS_KEY_ID": S3_KEY,
        "MOEFLOW_S3__SECRET_ACCESS_KEY": S3_KEY,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_PROFILE": None,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    bucket = f"moeflow-test-{uuid.uuid4().hex[:12]}"
    with patched_env(**env):
        client = boto3.client(
            "s3", endpoint_url=s3_server, region_name=S3_REGION,
            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/base"


@pytest.fixture(params=["local", "s3"])
def store_base(request, moeflow_home: str, tmp_path_factory) -> Iterator[str]:
    """A base URI on each backend in turn: a temporary directory, then a fresh moto bucket."""
    if request.param == "s3":
        base = request.getfixturevalue("s3_env")
    else:
        base = str(tmp_path_factory.mktemp("store"))
    with patched_env(MOEFLOW_STORE_URI=base):
        yield base


@pytest.fixture(scope="session")
def free_port():
    """`free_port()` -> a TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
