"""The job process: what `moeflow-job <stage> --config URI`, the one container/process entry point of every
stage, does once the top layer's registry has found the stage (`flows/job.py` wires the two).

Reads the job config by URI, validates it, opens a child MLflow run (rank 0), runs the stage from
`components/`, and writes the StageResult to `<output>/RESULT.json` last. Exit codes: 0 success,
1 failure worth retrying (crash, lost node), 3 bad input (retrying cannot help), 4 training diverged
(non-finite loss/gradients). The Kubernetes launcher's podFailurePolicy relies on these codes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from infra import storage
from infra.contract import (
    EXIT_BAD_INPUT,
    EXIT_CODE_FILE_ENV,
    EXIT_FAILED,
    ConfigError,
    NullTracker,
    StageContext,
    StageImpl,
    StageResult,
    dist_env,
)
from infra.owner import start_owner_watchdog
from infra.plan import validate_config
from infra.redact import install_log_redaction
from infra.settings import get_settings
from infra.storage.lease import Lease, LeaseHeld
from infra.tracking import create_run, git_commit, system_metrics

log = logging.getLogger("moeflow.job")
# Inputs that are datasets, logged with the stage's run as MLflow dataset inputs: input name -> context.
DATASET_INPUTS = {"dataset": "training", "traces": "training"}


def setup_logging(stage: str, rank: int) -> None:
    fmt = f"%(asctime)s {stage}" + (f"[rank{rank}]" if rank else "") + " %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    install_log_redaction()  # no URI password in any job log line
    for noisy in ("mlflow", "alembic", "botocore", "urllib3", "httpx", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_BAD_INPUT
    return int(getattr(exc, "exit_code", EXIT_FAILED))


def run_job(stage: str, impl: StageImpl, payload: dict[str, Any]) -> StageResult:
    """Run one stage in this process (also used in-process by tests)."""
    settings = get_settings()
    rank, world, local_rank = dist_env()
    cfg = validate_config(stage, impl.Config, payload["config"])
    lineage = {
        "stage": stage,
        "key": payload["key"],
        "inputs": {n: {"uri": u, "hash": payload["input_hashes"].get(n)} for n, u in payload["inputs"].items()},
        "config": payload["config"],
        "git_commit": git_commit(),
        "prefect_flow_run_id": payload.get("prefect_flow_run_id"),
        "parent_mlflow_run_id": payload.get("parent_run_id"),
    }
    workdir = settings.home / "work" / f"{stage}-{payload['key'][:16]}" / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    # one writer per content-addressed output: a second run of the same stage fails naming the first
    with Lease(payload["output_uri"]) if rank == 0 else contextlib.nullcontext():
        tracker: Any = NullTracker()
        if rank == 0:
            tracker = create_run(stage, parent_run_id=payload.get("parent_run_id"), source_type="JOB",
                                 tags={"moeflow.stage": stage, "moeflow.key": payload["key"],
                                       "prefect.flow_run_id": payload.get("prefect_flow_run_id")})
            lineage["mlflow_run_id"] = tracker.run_id
            tracker.log_params(payload["config"])
            for name, context in DATASET_INPUTS.items():  # what the stage reads, as MLflow dataset inputs
                if name in payload["inputs"]:
                    tracker.log_dataset(payload["inputs"][name], payload["input_hashes"].get(name) or "unknown",
                                        context=context)
        ctx = StageContext(stage=stage, output_uri=payload["output_uri"], workdir=workdir, tracker=tracker,
                           lineage=lineage, inputs=dict(payload["inputs"]), rank=rank, world_size=world,
                           local_rank=local_rank, settings=settings)
        t0 = time.time()
        status = "FAILED"
        try:
            with system_metrics(tracker, settings.system_metrics_interval_s) if rank == 0 else contextlib.nullcontext():
                out = impl.run(cfg, ctx)
            seconds = time.time() - t0
            # `extra` as JSON gives it back: a cached result reads exactly what a fresh run returned
            extra = json.loads(json.dumps(out.extra, default=str))
            result = StageResult(stage=stage, outputs=out.outputs, metrics=out.metrics, extra=extra, lineage=lineage,
                                 mlflow_run_id=tracker.run_id, seconds=seconds)
            if rank == 0:
                tracker.log_metrics({"stage_seconds": seconds})
                storage.write_json(payload["result_uri"], result.model_dump(mode="json"))
            status = "FINISHED"
            return result
        finally:
            if rank == 0:
                tracker.end(status)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None, resolve: Callable[[str], StageImpl]) -> int:
    """`moeflow-job`'s body; `resolve(stage)` gives the stage's implementation (the registry's lookup)."""
    code = _main(argv, resolve)
    # Under torchrun the agent exits 1 whenever a worker fails; the Kubernetes wrapper reads the worker's
    # own code from this file so the Job's failure policy can still tell bad input (3) from a crash (1).
    if code and os.environ.get(EXIT_CODE_FILE_ENV):
        with open(os.environ[EXIT_CODE_FILE_ENV], "w") as f:
            f.write(str(code))
    return code


def _main(argv: list[str] | None, resolve: Callable[[str], StageImpl]) -> int:
    parser = argparse.ArgumentParser(prog="moeflow-job", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="stage to run")
    parser.add_argument("--config", required=True, help="URI of the job config JSON")
    args = parser.parse_args(argv)
    rank = dist_env()[0]
    setup_logging(args.stage, rank)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # cancellation: run cleanup, mark the run KILLED
    start_owner_watchdog()  # the launcher is gone (even SIGKILLed): stop, leaving the last checkpoint
    try:
        payload = storage.read_json(args.config)
        if payload.get("stage") != args.stage:
            raise ConfigError(f"{args.config}: job config is for stage {payload.get('stage')!r}, not {args.stage!r}")
        result = run_job(args.stage, resolve(args.stage), payload)
    except KeyboardInterrupt:
        log.error("stage %s interrupted", args.stage)
        return 130
    except Exception as exc:  # the exit code is the job's contract with its launcher
        code = exit_code_for(exc)
        if code == EXIT_FAILED and not isinstance(exc, LeaseHeld):
            log.error("stage %s failed:\n%s", args.stage, traceback.format_exc())
        else:
            log.error("stage %s failed: %s", args.stage, exc)
        return code
    log.info("stage %s finished in %.1fs: %s", args.stage, result.seconds, result.outputs)
    return 0
