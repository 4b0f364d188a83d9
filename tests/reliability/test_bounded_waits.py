"""Bounded waits and masked credentials (issue 17, items 2 and 4) against endpoints that accept a connection
and never answer: a real socket on 127.0.0.1, real boto3, real MLflow client, the real `moeflow doctor`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import storage

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "hunter2-tracking-pw"
PREFECT_PASSWORD = "prefect-basic-pw"


@pytest.fixture(scope="module")
def silent_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT of a listener that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def test_an_unanswering_s3_endpoint_fails_within_the_configured_timeout(silent_endpoint, moeflow_home, patch_env):
    with patch_env(MOEFLOW_S3__ENDPOINT_URL=silent_endpoint, MOEFLOW_S3__ACCESS_KEY_ID="k",
                   MOEFLOW_S3__SECRET_ACCESS_KEY="s", MOEFLOW_S3__CONNECT_TIMEOUT_S="1",
                   MOEFLOW_S3__READ_TIMEOUT_S="2", MOEFLOW_S3__MAX_ATTEMPTS="2"):
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError) as err:
            storage.read_text("s3://bucket/any/key.txt")
        waited = time.monotonic() - t0
    assert waited < 10, waited  # 2 attempts x 2 s read timeout (+ backoff); botocore's defaults: minutes
    assert silent_endpoint in str(err.value) and "read_timeout_s=2" in str(err.value)


def test_doctor_bounds_every_check_and_never_prints_a_uri_password(silent_endpoint, moeflow_home):
    """Tracking and Prefect both hang; `moeflow doctor` (a real subprocess) answers within the timeouts, names
    each endpoint, and no password appears on stdout or stderr."""
    host = silent_endpoint.removeprefix("http://")
    env = {**os.environ, "MOEFLOW_HOME": moeflow_home, "MOEFLOW_SERVICE_TIMEOUT_S": "2",
           "MOEFLOW_TRACKING_URI": f"http://user:{PASSWORD}@{host}/",
           "MOEFLOW_PREFECT_API_URL": f"http://admin:{PREFECT_PASSWORD}@{host}/api",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    waited = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("tracking", "prefect"):
        assert not checks[name]["ok"] and checks[name]["seconds"] < 5, checks[name]
        assert host in checks[name]["detail"], checks[name]
    assert "no answer within 2 s" in checks["tracking"]["detail"]
    assert waited < 60  # interpreter start + imports on a busy machine; the checks themselves ~4 s
    for text in (proc.stdout, proc.stderr):
        assert PASSWORD not in text and PREFECT_PASSWORD not in text
    assert f"user:***@{host}" in proc.stdout
