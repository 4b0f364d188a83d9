"""Local Prefect server + MLflow UI on loopback, over the embedded stores that `make demo` filled.

The Prefect server uses the same `PREFECT_HOME` database as the ephemeral API the CLI runs flows with,
and the MLflow UI the same SQLite store and artifact root, so every run the demo made is there to browse
and re-trigger. Used by `moeflow up` and by the tests that need real servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.settings import Settings, get_settings


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback URL we started
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{name} did not answer at {url} within {timeout_s:.0f}s")


class LocalServices:
    """Start the Prefect server (UI + API) and the MLflow UI; stop both on exit."""

    def __init__(self, settings: Settings | None = None, *, prefect_port: int = 4200, mlflow_port: int = 5000,
                 host: str = "127.0.0.1", start_mlflow: bool = True, log_dir: Path | None = None):
        self.settings = settings or get_settings()
        self.host, self.prefect_port, self.mlflow_port = host, prefect_port, mlflow_port
        self.start_mlflow = start_mlflow
        self.log_dir = log_dir or self.settings.home / "logs"
        self.procs: list[subprocess.Popen] = []

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout_s: float = 180) -> LocalServices:
        env = {**os.environ}
        env.setdefault("PREFECT_HOME", str(self.settings.home / "prefect"))
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_UI_API_URL"] = self.prefect_api_url  # the UI otherwise calls the default port 4200
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        prefect = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                                 self.host, "--port", str(self.prefect_port)], env)
        mlflow = None
        if self.start_mlflow:
            cmd = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.mlflow_port),
                   "--backend-store-uri", self.settings.tracking_uri, "--workers", "1"]
            if self.settings.artifact_uri:
                cmd += ["--default-artifact-root", self.settings.artifact_uri]
            mlflow = self._spawn("mlflow-ui", cmd, env)
        try:
            wait_http(f"{self.prefect_api_url}/health", prefect, timeout_s, "Prefect server")
            if mlflow is not None:
                wait_http(f"{self.mlflow_url}/health", mlflow, timeout_s, "MLflow UI")
        except BaseException:
            self.stop()
            raise
        os.environ["PREFECT_API_URL"] = self.prefect_api_url
        return self

    def banner(self) -> str:
        lines = [f"Prefect UI: {self.prefect_url}   (API {self.prefect_api_url})"]
        if self.start_mlflow:
            lines.append(f"MLflow UI:  {self.mlflow_url}")
        lines.append(f"logs: {self.log_dir}   Ctrl-C stops everything")
        return "\n".join(lines)

    def wait(self) -> None:
        while all(p.poll() is None for p in self.procs):
            time.sleep(1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
