"""MLflow tracking: runs, batched metrics, PNG plots, parent/child runs across processes.

A flow opens a parent run (`start_run`); it hands the run id to its jobs (in the job config and the
`MOEFLOW_PARENT_RUN_ID` environment variable); each job opens a child run tagged
`mlflow.parentRunId`. The tracking URI comes from settings (default: SQLite under `.moeflow/`).
Nothing here ever logs settings secrets: params are whatever the caller passes, and callers pass configs,
never `Settings`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from infra.redact import mask_uri, redact
from infra.settings import Settings, get_settings
from infra.timeouts import call_with_timeout

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MOEFLOW_PARENT_RUN_ID"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def _client(settings: Settings | None = None):
    from mlflow import MlflowClient

    settings = settings or get_settings()
    return MlflowClient(tracking_uri=settings.tracking_uri)


def experiment_id(settings: Settings | None = None) -> str:
    """The id of the configured experiment, created (with the configured artifact root) if missing."""
    settings = settings or get_settings()
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = _client(settings)
    exp = client.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=settings.artifact_uri)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(settings.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The commit of the code that runs (env MOEFLOW_GIT_COMMIT wins: images have no .git)."""
    if os.environ.get("MOEFLOW_GIT_COMMIT"):
        return os.environ["MOEFLOW_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


_INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(key: str) -> str:
    """The form of a metric name used in MLflow, configs and tags: MLflow keys allow letters, digits, '_',
    '-', '.', ' ' and '/', so 'pass@1' becomes 'pass_at_1'."""
    return _INVALID_KEY_CHARS.sub("_", str(key).replace("@", "_at_"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def run_url(run_id: str, settings: Settings | None = None) -> str:
    """Link to a run in the MLflow UI."""
    settings = settings or get_settings()
    client = _client(settings)
    exp = client.get_run(run_id).info.experiment_id
    return f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


class Tracker:
    """One MLflow run. Metrics are buffered and sent with `log_batch` (every `flush_every` values or
    `flush_s` seconds, and at `flush()`/close), so a training loop never waits on the tracking server."""

    def __init__(self, run_id: str, settings: Settings | None = None, *, flush_every: int = 200,
                 flush_s: float = 5.0):
        self.run_id = run_id
        self.settings = settings or get_settings()
        self.client = _client(self.settings)
        self._buf: list[Any] = []
        self._lock = threading.Lock()
        self._flush_every = flush_every
        self._flush_s = flush_s
        self._last_flush = time.monotonic()

    # ---- params / tags ------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), redact(str(v))[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    # ---- metrics --------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if v is None:
                    continue
                self._buf.append(Metric(metric_key(k), float(v), ts, int(step or 0)))
            due = len(self._buf) >= self._flush_every or time.monotonic() - self._last_flush > self._flush_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            buf, self._buf = self._buf, []
            self._last_flush = time.monotonic()
        for i in range(0, len(buf), 1000):
            self.client.log_batch(self.run_id, metrics=buf[i : i + 1000])

    # ---- artifacts ------------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as PNG artifact `name` (e.g. 'plots/loss.png') and close it."""
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(name).name
            fig.savefig(p, dpi=110, bbox_inches="tight")
            plt.close(fig)
            parent = str(Path(name).parent)
            self.log_artifact(p, None if parent == "." else parent)

    def log_dataset(self, uri: str, digest: str, *, context: str, schema: Mapping[str, Any] | None = None,
                    profile: Mapping[str, Any] | None = None) -> None:
        """Record a dataset this run used or made (`mlflow.log_input`'s entity): named after its place in the
        store (`prep/<key>`), its content digest, its URI as the source, and an optional schema/profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        parts = uri.rstrip("/").split("/")
        name = "/".join(parts[-3:-1]) if len(parts) >= 3 else parts[-1]
        dataset = Dataset(name=name, digest=digest.split(":")[-1][:36], source_type="moeflow-store",
                          source=json.dumps({"uri": redact(uri)}),
                          schema=json.dumps(schema) if schema is not None else None,
                          profile=json.dumps(profile) if profile is not None else None)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context",
                                                                                           context)])])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


def create_run(name: str, *, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
               settings: Settings | None = None, source_type: str = "LOCAL") -> Tracker:
    """Create an MLflow run (child of `parent_run_id` when given), tagged as MLflow's own fluent API would
    tag it (user, source name and type: JOB for a stage's job, LOCAL for a flow) and with the git commit."""
    settings = settings or get_settings()
    if settings.tracking_uri.startswith(("http://", "https://")):  # a server that may not answer: bounded
        exp = call_with_timeout(lambda: experiment_id(settings), settings.service_timeout_s,
                                f"MLflow tracking server {mask_uri(settings.tracking_uri)}")
    else:  # SQLite: the first call migrates the database, which may take long on a busy machine
        exp = experiment_id(settings)
    all_tags = {"moeflow.git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
                "mlflow.user": _user(), "mlflow.source.type": source_type,
                "mlflow.source.name": " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) or "moeflow"}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        all_tags["prefect.flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    all_tags.update(tags or {})
    run = _client(settings).create_run(
        exp, run_name=name, tags={k: redact(str(v)) for k, v in all_tags.items() if v is not None}
    )
    return Tracker(run.info.run_id, settings)


@contextlib.contextmanager
def system_metrics(tracker: Tracker, interval_s: float) -> Iterator[None]:
    """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, GPU
    use where there is one) sampled every `interval_s` seconds into the tracker's run for the block; off at 0."""
    if not interval_s:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s,
                                   tracking_uri=tracker.settings.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def start_run(name: str, *, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
              settings: Settings | None = None) -> Iterator[Tracker]:
    """Open a run for the duration of the block; it ends FAILED if the block raises (or is killed by
    KeyboardInterrupt), FINISHED otherwise."""
    tracker = create_run(name, parent_run_id=parent_run_id, tags=tags, settings=settings)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            tracker.end(status)
        except Exception as exc:  # never mask the real error with a tracking one
            log.warning("could not close MLflow run %s: %s", tracker.run_id, exc)
