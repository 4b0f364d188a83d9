"""The stage contract: what a stage is given and returns, and what a job is (`JobSpec`, `Launcher`).

A stage package (`components/<package>/stage.py`) provides what `StageImpl` names: a typed `Config`,
`input_uris(cfg)` and `run(cfg, ctx: StageContext) -> StageOutput`. The platform (this package) never
imports a stage by name: the top layer's stage registry (`flows/registry.py`) hands the module in.

Only URIs cross process boundaries: a job gets its config by URI and leaves its `StageResult` (JSON) at
`spec.result_uri`, which the launcher reads back from storage once the process or pod has finished.
A launcher backend (local subprocess / torchrun, Kubernetes Job) implements `Launcher.run`; flows only
ever see this interface, so a new backend drops in without changing them.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from infra.settings import Settings, get_settings

LogFn = Callable[[str], None]

# The job process's entry module (console script `moeflow-job`): the top layer's wiring of the stage registry
# to `infra.entry`. Launchers run it by name (`python -m ...`), so infra imports no stage and no flow.
JOB_ENTRY_MODULE = "flows.job"
# Under torchrun the agent exits 1 whenever a worker fails: a worker writes its own exit code to this file
# (infra.entry) and the Kubernetes torchrun wrapper exits with it (infra.launch.torchrun_wrapper).
EXIT_CODE_FILE_ENV = "MOEFLOW_EXIT_CODE_FILE"

# Exit codes of `moeflow-job` (the Kubernetes podFailurePolicy fails the Job fast on the last two).
EXIT_OK = 0
EXIT_FAILED = 1  # crash or lost resources: worth retrying
EXIT_BAD_INPUT = 3  # invalid config or data: retrying cannot help
EXIT_DIVERGED = 4  # non-finite loss or gradients beyond the allowed skips

# Labels tying a job to its stage, the Prefect flow run and the MLflow run (JobSpec.labels keys).
LABEL_STAGE = "moeflow.dev/stage"
LABEL_FLOW_RUN = "prefect.io/flow-run-id"  # the label Prefect's own Kubernetes worker puts on flow-run Jobs
LABEL_MLFLOW_RUN = "moeflow.dev/mlflow-run-id"


class Resources(BaseModel):
    """Compute a job asks for. `procs_per_node > 1` or `nodes > 1` runs the stage under torchrun."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, gt=0, description="CPU cores per node (Kubernetes request/limit)")
    memory_gb: float = Field(4.0, gt=0, description="memory per node in GiB")
    gpus: int = Field(0, ge=0, description="GPUs per node (nvidia.com/gpu)")
    procs_per_node: int = Field(1, ge=1, description="processes per node (torchrun --nproc-per-node)")
    nodes: int = Field(1, ge=1, description="number of nodes (torchrun --nnodes)")


class JobSpec(BaseModel):
    """Everything a launcher needs to run `moeflow-job <stage> --config <config_uri>`."""

    model_config = ConfigDict(extra="forbid")
    stage: str = Field(description="stage name, e.g. 'prep' or 'pretrain'")
    name: str = Field(description="job name, unique per stage run (DNS-1123 friendly)")
    config_uri: str = Field(description="URI of the JSON job config the job reads")
    result_uri: str = Field(description="URI where the job writes its StageResult JSON")
    resources: Resources = Field(default_factory=Resources)
    image: str | None = Field(None, description="container image (Kubernetes backend)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (no secrets)")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit of the job")
    labels: dict[str, str] = Field(default_factory=dict, description="e.g. prefect flow-run / mlflow run ids")


RESULT_NAME = "RESULT.json"  # a stage's StageResult, written last under its output location
JOB_CONFIG_NAME = "job.json"  # the job config a launcher hands to `moeflow-job`


class ConfigError(ValueError):
    """Bad user input in a config: the message names the field (or file:line) and what to change."""


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradients beyond the allowed skips: the job exits with EXIT_DIVERGED (never retried)."""

    exit_code = EXIT_DIVERGED


@dataclass
class StageOutput:
    """What `run()` returns: output URIs (each published), headline metrics (numbers, logged to MLflow),
    and `extra`: typed JSON values the flows need (versions, digests, decisions), kept as they are."""

    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a running stage gets from the platform: where to publish, its inputs (name -> URI, the same
    mapping `input_uris(cfg)` gave), its tracker and lineage, and its place among the job's processes."""

    stage: str
    output_uri: str
    workdir: Path
    tracker: Any  # infra.tracking.Tracker on rank 0, a no-op tracker elsewhere
    lineage: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    settings: Settings = field(default_factory=get_settings)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StageImpl(Protocol):
    """A stage package's `stage` module, as the platform uses it."""

    Config: type[BaseModel]

    def input_uris(self, cfg: Any) -> dict[str, str]: ...

    def run(self, cfg: Any, ctx: StageContext) -> StageOutput: ...


class NullTracker:
    """Tracker for ranks other than 0: every call is a no-op."""

    run_id: str | None = None

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 outside torchrun)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


class StageResult(BaseModel):
    """What a finished stage leaves behind: output URIs, metrics, typed extra values and lineage."""

    stage: str
    outputs: dict[str, str] = Field(default_factory=dict, description="output name -> URI")
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict, description="typed values the flows read (StageOutput.extra)")
    lineage: dict[str, Any] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    cached: bool = Field(False, description="True when the output already existed and nothing ran")


class JobFailed(RuntimeError):
    """A job exited non-zero, timed out or was cancelled; the message carries its last log lines."""

    def __init__(self, message: str, *, exit_code: int | None = None, log_tail: list[str] | None = None):
        self.exit_code = exit_code
        self.log_tail = list(log_tail or [])
        tail = "\n".join(self.log_tail)
        super().__init__(f"{message}\n--- last log lines ---\n{tail}" if tail else message)


class Launcher(abc.ABC):
    """Runs a JobSpec to completion and returns the job's StageResult read back from storage."""

    name: str = "abstract"

    @abc.abstractmethod
    def run(
        self,
        spec: JobSpec,
        *,
        on_log: LogFn | None = None,
        cancel: threading.Event | None = None,
    ) -> StageResult:
        """Run the job; stream each log line to `on_log`; stop it when `cancel` is set.

        Raises `JobFailed` (with the last log lines) on a non-zero exit, a timeout or a cancellation.
        """
