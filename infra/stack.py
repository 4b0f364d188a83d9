"""The Helm chart's topology on one machine (`moeflow up --cluster-like`), every part real, on loopback:

  PostgreSQL (Debian's `initdb`/`pg_ctl`)  <- the Prefect server (asyncpg, migrations on start)
                                           <- the MLflow server (psycopg2; artifacts proxied to S3)
  moto's S3 server, bucket `moeflow`       <- the MLflow server, the flow runs, the stage jobs
  a Prefect worker on a `process` work pool: the chart's Kubernetes worker, each flow run a subprocess

`chart_env()` is the one place the environment of each part comes from: the names and URI shapes the
chart renders (helm/moeflow/templates, values.yaml defaults) with this machine's addresses filled in.
tests/stack/test_chart_agreement.py renders the chart and compares it with this mapping, so the two cannot
drift; the differences that only Kubernetes has (pod metadata, the Kubernetes launcher's settings) are the
named sets `KUBERNETES_ONLY` and `STACK_ONLY`.

Everything started is stopped by `stop()`: each server's process group gets SIGTERM, then SIGKILL after a
timeout; PostgreSQL stops with `pg_ctl stop -m fast`. PostgreSQL refuses to run as root: as root its
data directory lives in /tmp (readable by the `postgres` user, who runs it), else under MOEFLOW_HOME.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from infra.local_services import CLIENT_AUTH_VAR, SERVER_AUTH_VAR, LocalServices, prefect_auth_string, wait_http
from infra.settings import Settings

# values.yaml defaults the stack shares with the chart
PG_USER = "moeflow"
PG_DATABASES = {"prefect": "prefect", "mlflow": "mlflow"}
BUCKET, STORE_PREFIX = "moeflow", "store"
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow-artifacts"
REGION = "us-east-1"
WORK_POOL = "moeflow-process"
REPO_ROOT = Path(__file__).resolve().parent.parent  # the chart's is `moeflow-kubernetes`, of type kubernetes

# Env the chart gives only because it runs on Kubernetes (pod metadata, the Kubernetes launcher's
# settings, the worker's namespace watch, optional MLflow client credentials the chart never creates).
KUBERNETES_ONLY = ("HOME", "MOEFLOW_OWNER_POD_", "MOEFLOW_KUBERNETES__", "PREFECT_INTEGRATIONS_KUBERNETES_",
                   "PREFECT_KUBERNETES_", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Env only the stack sets: the worker passes its own env to flow-run subprocesses; in the chart the
# worker copies PREFECT_API_URL into each flow-run Job itself (prefect.workers.base).
STACK_ONLY: dict[str, tuple[str, ...]] = {"flow-run": ("PREFECT_API_URL",)}
# Values that differ on purpose: no Kubernetes here, so stages run as local subprocesses.
STACK_VALUES = {"flow-run": {"MOEFLOW_LAUNCHER": "local"}}


def chart_env(*, pg: str, password: str, s3: str, mlflow: str, prefect_api: str, auth: str,
              access_key: str, secret_key: str, home: Path) -> dict[str, dict[str, str]]:
    """The environment of each part as the chart renders it (secrets resolved), for these addresses.
    `pg`, `s3`, `mlflow`: host:port; `prefect_api`: the API URL (its UI is the same address without /api).
    Keys: prefect-server, prefect-worker, mlflow, flow-run (the chart's settings ConfigMap + the work pool's
    base job template)."""
    aws = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    return {
        "prefect-server": {
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"postgresql+asyncpg://{PG_USER}:{password}@{pg}/{PG_DATABASES['prefect']}",
            SERVER_AUTH_VAR: auth, CLIENT_AUTH_VAR: auth,
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(home / "prefect-server"),
        },
        "prefect-worker": {
            "PREFECT_API_URL": prefect_api, CLIENT_AUTH_VAR: auth, "PREFECT_HOME": str(home / "prefect-worker"),
        },
        "mlflow": {
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{PG_USER}:{password}@{pg}/{PG_DATABASES['mlflow']}",
            **aws, "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": f"http://{s3}",
        },
        "flow-run": {
            "MOEFLOW_LAUNCHER": "kubernetes",
            "MOEFLOW_STORE_URI": f"s3://{BUCKET}/{STORE_PREFIX}",
            "MOEFLOW_TRACKING_URI": f"http://{mlflow}",
            "MOEFLOW_PREFECT_UI_URL": prefect_api.removesuffix("/api"), "MOEFLOW_MLFLOW_UI_URL": f"http://{mlflow}",
            "MOEFLOW_S3__REGION": REGION,
            "MOEFLOW_S3__ENDPOINT_URL": f"http://{s3}",
            **aws, CLIENT_AUTH_VAR: auth,
            "PREFECT_HOME": str(home / "flow-runs" / "prefect"), "MOEFLOW_HOME": str(home / "flow-runs"),
        },
    }


def stack_env(**kw: Any) -> dict[str, dict[str, str]]:
    """`chart_env` as the stack runs it: STACK_VALUES applied, the STACK_ONLY additions made."""
    env = chart_env(**kw)
    for part, values in STACK_VALUES.items():
        env[part].update(values)
    env["flow-run"]["PREFECT_API_URL"] = kw["prefect_api"]
    return env


def mlflow_server_args() -> list[str]:
    """The chart's MLflow command line after `mlflow server --host H --port P`."""
    return ["--serve-artifacts", "--artifacts-destination", MLFLOW_ARTIFACTS]


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (/usr/lib/postgresql/<version>/bin), the newest version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise FileNotFoundError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): "
                                "`apt-get install postgresql`, or run `make browser` as root")
    return Path(found[-1]).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen | None, timeout_s: float, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{name} did not listen on {host}:{port} within {timeout_s:.0f}s")


class Postgres:
    """One PostgreSQL cluster on loopback (TCP only, password auth), made with `initdb` on first use."""

    def __init__(self, data_dir: Path, port: int, password: str, log: Path, host: str = "127.0.0.1"):
        self.data_dir, self.port, self.password, self.log, self.host = data_dir, port, password, log, host
        self.bin = postgres_bin()
        self.user = "postgres" if os.geteuid() == 0 else None  # postgres will not run as root

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        proc = subprocess.run([str(self.bin / cmd[0]), *cmd[1:]], user=self.user, env=env, capture_output=True,
                              text=True, timeout=timeout, cwd="/")
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            pwfile = self.data_dir.parent / f".pw-{secrets.token_hex(4)}"
            pwfile.write_text(self.password + "\n")
            if self.user:
                shutil.chown(self.data_dir, self.user)
                shutil.chown(pwfile, self.user)
            try:
                self._run("initdb", "-D", str(self.data_dir), "-U", PG_USER, f"--pwfile={pwfile}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions")
            finally:
                pwfile.unlink()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if self.user:
            self.log.touch()
            shutil.chown(self.log, self.user)
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-h {self.host} -p {self.port} -c unix_socket_directories=''", timeout=90)
        for db in PG_DATABASES.values():
            try:
                self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", PG_USER, db)
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", timeout=90)


def stack_prefect_yaml(src: Path, dst: Path, workdir: Path, pool: str = WORK_POOL) -> Path:
    """prefect.yaml for the stack's process work pool: the same deployments with the pool renamed, the
    Kubernetes-only job variables dropped, and the pull step pointed at `workdir` (the image's /opt/moeflow)."""
    data = yaml.safe_load(src.read_text())
    data.pop("definitions", None)
    data["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(workdir)}}]
    for d in data["deployments"]:
        wp = d.get("work_pool") or {}
        d["work_pool"] = {"name": pool, "work_queue_name": wp.get("work_queue_name", "default"), "job_variables": {}}
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


class ClusterStack(LocalServices):
    """PostgreSQL, moto's S3, the Prefect server, the MLflow server and a Prefect process worker, with
    the chart's environment (`stack_env`). While started, this process is a flow-run client of the stack
    (the flow-run env is set in os.environ; `stop()` restores it)."""

    def __init__(self, settings: Settings, *, prefect_port: int = 4200, mlflow_port: int = 5000,
                 s3_port: int = 9000, pg_port: int = 5432, host: str = "127.0.0.1", worker: bool = True):
        super().__init__(settings, prefect_port=prefect_port, mlflow_port=mlflow_port, host=host,
                         log_dir=settings.home / "stack" / "logs")
        self.s3_port, self.pg_port, self.with_worker = s3_port, pg_port, worker
        self.stack_home = settings.home / "stack"
        if os.geteuid() == 0:  # every ancestor must be searchable by the postgres user
            tag = hashlib.sha256(str(self.stack_home).encode()).hexdigest()[:12]
            pg_dir = Path("/tmp") / f"moeflow-postgres-{tag}"
        else:
            pg_dir = self.stack_home / "postgres"
        secrets_file = self.stack_home / "credentials.yaml"
        self.creds = self._credentials(secrets_file)
        self.postgres = Postgres(pg_dir / "data", pg_port, self.creds["postgres_password"],
                                 pg_dir / "postgres.log", host)  # the postgres user must reach its log
        self.env: dict[str, dict[str, str]] = {}

    @staticmethod
    def _credentials(path: Path) -> dict[str, str]:
        """Generated once per MOEFLOW_HOME (mode 0600), like the chart's Secrets kept across upgrades."""
        if path.exists():
            return yaml.safe_load(path.read_text())
        path.parent.mkdir(parents=True, exist_ok=True)
        creds = {"postgres_password": secrets.token_urlsafe(24), "access_key": "moeflow",
                 "secret_key": secrets.token_urlsafe(24)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(creds, f)
        return creds

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def _base_env(self) -> dict[str, str]:
        drop = ("PREFECT_", "MOEFLOW_", "MLFLOW_", "AWS_")
        return {k: v for k, v in os.environ.items() if not k.startswith(drop)}

    def start(self, timeout_s: float = 240) -> ClusterStack:
        self.auth_string = prefect_auth_string(self.settings.home)
        self.env = stack_env(pg=f"{self.host}:{self.pg_port}", password=self.creds["postgres_password"],
                             s3=f"{self.host}:{self.s3_port}", mlflow=f"{self.host}:{self.mlflow_port}",
                             prefect_api=self.prefect_api_url, auth=self.auth_string,
                             access_key=self.creds["access_key"], secret_key=self.creds["secret_key"],
                             home=self.stack_home)
        base = self._base_env()
        try:
            self.postgres.start()
            moto = self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", self.host, "-p",
                                      str(self.s3_port)], base)
            wait_port(self.host, self.s3_port, moto, timeout_s, "moto S3 server")
            self._create_bucket()
            prefect = self._spawn("prefect-server", [
                sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port",
                str(self.prefect_port)],
                {**base, **self.env["prefect-server"], "PREFECT_UI_API_URL": self.prefect_api_url})
            mlflow = self._spawn("mlflow-server", [
                sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.mlflow_port),
                "--workers", "1", *mlflow_server_args()], {**base, **self.env["mlflow"]})
            wait_http(f"{self.prefect_api_url}/health", prefect, timeout_s, "Prefect server")
            wait_http(f"{self.mlflow_url}/health", mlflow, timeout_s, "MLflow server")
            if self.with_worker:
                # a process worker hands its own environment to each flow run: the flow-run env goes here
                worker = self._spawn("prefect-worker", [
                    sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                    {**base, **self.env["flow-run"], **self.env["prefect-worker"]})
                self._wait_work_pool(worker, timeout_s)  # the worker creates it; deployments need it
        except BaseException:
            self.stop()
            raise
        client = {k: None for k in os.environ if k.startswith(("MOEFLOW_", "AWS_", "MLFLOW_"))}
        client.update({"PREFECT_API_URL": None, CLIENT_AUTH_VAR: None, **self.env["flow-run"]})
        client.pop("PREFECT_HOME")
        self._saved_env = {k: os.environ.get(k) for k in client}
        self._set_client_env(client)
        return self

    def deploy(self, repo: Path = REPO_ROOT, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`prefect deploy --all` of the repository's prefect.yaml, pointed at this stack's work pool
        (`stack_prefect_yaml`), as a client of this stack."""
        path = stack_prefect_yaml(repo / "prefect.yaml", self.stack_home / "prefect.yaml", repo)
        env = {**self._base_env(), **self.env["prefect-worker"], "PREFECT_HOME": str(self.stack_home / "deploy")}
        proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                               str(path)], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
            raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def api_get(self, path: str) -> Any:
        """GET on the Prefect API with this stack's credential."""
        req = urllib.request.Request(f"{self.prefect_api_url}{path}", headers={
            "Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode()})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback server we started
            return json.loads(resp.read())

    def _wait_work_pool(self, worker: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the Prefect worker exited with code {worker.returncode}; see {self.log_dir}")
            try:
                self.api_get(f"/work_pools/{WORK_POOL}")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
            time.sleep(0.5)
        raise TimeoutError(f"the Prefect worker did not create work pool {WORK_POOL} within {timeout_s:.0f}s")

    def _create_bucket(self) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, region_name=REGION,
                          aws_access_key_id=self.creds["access_key"], aws_secret_access_key=self.creds["secret_key"])
        s3.create_bucket(Bucket=BUCKET)

    def banner(self) -> str:
        lines = super().banner().splitlines()
        lines[-1:-1] = [f"PostgreSQL: {self.host}:{self.pg_port} (user {PG_USER}, databases "
                        f"{', '.join(PG_DATABASES.values())}; password in {self.stack_home / 'credentials.yaml'})",
                        f"S3 (moto): {self.s3_url}   bucket {BUCKET}: store s3://{BUCKET}/{STORE_PREFIX}, "
                        f"MLflow artifacts {MLFLOW_ARTIFACTS}",
                        f"worker:     pool {WORK_POOL} (type process; the chart's is moeflow-kubernetes)"]
        return "\n".join(lines)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.postgres.stop()

