"""Local Prefect server + MLflow UI on loopback, over the embedded stores that `make demo` filled.

The Prefect server uses the same `PREFECT_HOME` database as the ephemeral API the CLI runs flows with,
and the MLflow UI the same SQLite store and artifact root, so every run the demo made is there to browse
and re-trigger. Used by `moeflow up` and by the tests that need real servers.

The Prefect API is not open to whoever can reach the port: it asks for HTTP basic auth (Prefect's
`PREFECT_SERVER_API_AUTH_STRING`), with one random credential per MOEFLOW_HOME kept in
`<home>/prefect-api-auth` (mode 0600, reused by the next `moeflow up`). Every client this process runs or
starts (the deployments `moeflow up` serves and the flow-run processes they spawn) gets it as
`PREFECT_API_AUTH_STRING`; the UI asks for it once per browser.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> bool:
    """SIGTERM the process group `proc` leads (a server's workers, a Prefect worker's flow runs), wait until
    every member is gone (the leader often exits before its children), then SIGKILL what is left.
    False if something survived even that (never seen; the caller says so and stops the rest)."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return True
            time.sleep(0.2)
    return False


def interrupt_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Ctrl-C, as a user stops `moeflow up` (SIGINT to the leader, which stops its services in order); the
    whole process group with SIGKILL if the leader has not exited within `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


AUTH_FILE_NAME = "prefect-api-auth"
AUTH_USER = "moeflow"
# Set on the server (it checks requests) and on every client (it sends the header): Prefect's own names.
SERVER_AUTH_VAR, CLIENT_AUTH_VAR = "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"


def _read_auth_file(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path}: the Prefect API credential is readable by other users "
                              f"(mode {stat.filemode(mode)}); run `chmod 600 {path}`, or delete the file "
                              "to get a new credential at the next `moeflow up`")
    value = path.read_text().strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{path}: expected one line `user:password` (the Prefect API credential); "
                         "delete the file to get a new one at the next `moeflow up`")
    return value


def prefect_auth_string(home: Path) -> str:
    """The Prefect API credential of this MOEFLOW_HOME, `moeflow:<random>`: read from `<home>/prefect-api-auth`,
    which is created with mode 0600 on first use (atomically: two `up`s at once agree on one value)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / AUTH_FILE_NAME
    if not path.exists():
        tmp = home / f".{AUTH_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
            try:
                os.link(tmp, path)  # fails if another process created it first: theirs is kept
            except FileExistsError:
                pass
        finally:
            tmp.unlink()
    return _read_auth_file(path)


def mask_auth_string(value: str) -> str:
    """`user:secret` -> `user:****` (what may be printed)."""
    user, sep, _ = value.partition(":")
    return f"{user}{sep}****" if sep else "****"


class LocalServices:
    """Start the Prefect server (UI + API) and the MLflow UI; stop both on exit.

    While started, this process's environment points Prefect clients at the server (`client_env()`:
    `PREFECT_API_URL` and, with `auth`, `PREFECT_API_AUTH_STRING`); `stop()` restores what was there.
    `auth=False` serves an open API (only for tests that drive the UI without logging in).
    """

    def __init__(self, settings: Settings | None = None, *, prefect_port: int = 4200, mlflow_port: int = 5000,
                 host: str = "127.0.0.1", start_mlflow: bool = True, log_dir: Path | None = None,
                 auth: bool = True):
        self.settings = settings or get_settings()
        self.host, self.prefect_port, self.mlflow_port = host, prefect_port, mlflow_port
        self.start_mlflow = start_mlflow
        self.log_dir = log_dir or self.settings.home / "logs"
        self.auth_file: Path | None = self.settings.home / AUTH_FILE_NAME if auth else None
        self.auth_string: str | None = None
        self.procs: list[subprocess.Popen] = []
        self._saved_env: dict[str, str | None] = {}

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a Prefect client (serve, a worker, a flow run) needs to use this server."""
        env = {"PREFECT_API_URL": self.prefect_api_url}
        if self.auth_string:
            env[CLIENT_AUTH_VAR] = self.auth_string
        return env

    def _set_client_env(self, values: dict[str, str | None]) -> None:
        """Set (None: unset) variables of this process; Prefect reads its settings once at import, so an
        already imported Prefect is told to read them again."""
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "prefect.context" in sys.modules:
            sys.modules["prefect.context"].refresh_global_settings_context()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout_s: float = 180) -> LocalServices:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", SERVER_AUTH_VAR, CLIENT_AUTH_VAR)}
        env.setdefault("PREFECT_HOME", str(self.settings.home / "prefect"))
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        server_env = {**env, "PREFECT_UI_API_URL": self.prefect_api_url}  # the UI otherwise calls port 4200
        if self.auth_file is not None:
            self.auth_string = prefect_auth_string(self.auth_file.parent)
            server_env[SERVER_AUTH_VAR] = server_env[CLIENT_AUTH_VAR] = self.auth_string
        prefect = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                                 self.host, "--port", str(self.prefect_port)], server_env)
        mlflow = None
        if self.start_mlflow:
            cmd = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.mlflow_port),
                   "--backend-store-uri", self.settings.tracking_uri, "--workers", "1"]
            if self.settings.artifact_uri:
                cmd += ["--default-artifact-root", self.settings.artifact_uri]
            mlflow = self._spawn("mlflow-ui", cmd, env)  # no Prefect credential: MLflow has no use for it
        try:
            wait_http(f"{self.prefect_api_url}/health", prefect, timeout_s, "Prefect server")
            if mlflow is not None:
                wait_http(f"{self.mlflow_url}/health", mlflow, timeout_s, "MLflow UI")
        except BaseException:
            self.stop()
            raise
        client = {"PREFECT_API_URL": None, CLIENT_AUTH_VAR: None, **self.client_env()}
        self._saved_env = {k: os.environ.get(k) for k in client}
        self._set_client_env(client)
        return self

    def banner(self) -> str:
        lines = [f"Prefect UI: {self.prefect_url}   (API {self.prefect_api_url})"]
        if self.auth_string:
            lines.append(f"Prefect login: {mask_auth_string(self.auth_string)}   (the whole string is in "
                         f"{self.auth_file}; the UI asks for it once per browser)")
            lines.append(f"other shells: export PREFECT_API_AUTH_STRING=$(cat {self.auth_file})")
        if self.start_mlflow:
            lines.append(f"MLflow UI:  {self.mlflow_url}")
        lines.append(f"logs: {self.log_dir}   Ctrl-C stops everything")
        return "\n".join(lines)

    def wait(self) -> None:
        while all(p.poll() is None for p in self.procs):
            time.sleep(1)

    def stop(self) -> None:
        for p in reversed(self.procs):  # clients (a worker) before the servers they use
            if not stop_group(p):
                print(f"warning: process group {p.pid} ({' '.join(map(str, p.args[:4]))}) survived SIGKILL",
                      file=sys.stderr)
        self.procs.clear()
        if self._saved_env:
            self._set_client_env(self._saved_env)
            self._saved_env = {}

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
