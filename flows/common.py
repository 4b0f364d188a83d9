"""What every flow shares: the retried `run_stage` task and the parent MLflow run of a flow.

Flows only orchestrate: `run_stage` plans a stage (validates its config, derives the content-addressed
output location), returns at once when that output already exists, otherwise hands a `JobSpec` to the
configured launcher and waits. A retried task lands on the same output location, so a stage that
checkpoints (pretraining, RL, distillation) resumes instead of starting over.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.registry import get as get_stage
from infra import storage
from infra.configfile import apply_overrides, load_yaml, set_path
from infra.contract import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    LABEL_FLOW_RUN,
    LABEL_MLFLOW_RUN,
    LABEL_STAGE,
    ConfigError,
    JobFailed,
    JobSpec,
    Resources,
    StageResult,
)
from infra.launch import get_launcher
from infra.plan import cached_result, job_payload
from infra.settings import get_settings
from infra.tracking import PARENT_RUN_ENV, Tracker, create_run, run_url

NOT_RETRIED_EXIT_CODES = {EXIT_BAD_INPUT, EXIT_DIVERGED}
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


# ---- the parameters of a deployed stage flow: a preset, a few typed fields, overrides ---------------
def _preset_files(stage: str) -> dict[str, tuple[Path, bool]]:
    """name -> (file, whether the whole file is the stage's config): the shipped presets with a section for
    `stage` (configs/*.yaml) and the stage's own config files (configs/<stage>/*.yaml, e.g. the GPU
    pretraining presets); a name in both is the former's."""
    files = {p.stem: (p, False) for p in sorted(PRESETS_DIR.glob("*.yaml")) if stage in (load_yaml(p) or {})}
    for p in sorted((PRESETS_DIR / stage).glob("*.yaml")):
        files.setdefault(p.stem, (p, True))
    return files


def presets_with(stage: str) -> tuple[str, ...]:
    """The shipped presets for `stage` (see `_preset_files`), the default first."""
    return tuple(sorted(_preset_files(stage), key=lambda n: (n != DEFAULT_PRESET, n)))


def preset_choice(stage: str) -> Any:
    """The type of a stage flow's `preset` parameter: one of the shipped presets for that stage (the Prefect
    form shows a drop-down; anything else is rejected before the run starts)."""
    return Literal[presets_with(stage)]  # type: ignore[valid-type]


def _preset_section(stage: str, path: Path, whole: bool) -> dict[str, Any]:
    data = load_yaml(path) or {}
    return dict(data if whole else data.get(stage) or {})


def preset_default(stage: str, key: str) -> Any:
    """The default preset's value at the dotted `key` of `stage`'s section: the default of a flow field
    whose value the form should show (a `latest:` reference), so that the form says what a Quick run uses."""
    value: Any = _preset_section(stage, PRESETS_DIR / f"{DEFAULT_PRESET}.yaml", False)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _form_hint(fields: dict[str, Any]) -> Callable[[str], str]:
    """How a Prefect form user sets the config field at a dotted path: the flow field that sets it (named
    like the last part of its config path: `suite.dataset` is the field `dataset`), else an override."""
    def hint(path: str) -> str:
        for key in fields:
            if path == key or path.startswith(key + "."):
                return f"set the field `{key.rsplit('.', 1)[-1]}` to a URI"
        return f"add the override `{path}=<URI>`"
    return hint


def flow_log(line: str) -> None:
    """A line for the flow run's log (what the UI shows); outside a run, the module's logger."""
    try:
        logger: Any = get_run_logger()
    except MissingContextError:  # not in a flow run (a test, a plain call)
        logger = logging.getLogger(__name__)
    logger.info("%s", line)


def preset_config(stage: str, preset: str, fields: dict[str, Any], overrides: list[str] | None) -> BaseModel:
    """The stage's config: the preset's section, then the flow's typed fields that are set (dotted keys,
    None = the preset's value), then the `key=value` overrides, then `latest:` references resolved to URIs
    (each logged; `flows.references`); validated before and after (errors name the field)."""
    from flows.references import resolve_references

    files = _preset_files(stage)  # reads every preset file: once
    if preset not in files:
        raise ConfigError(f"preset {preset!r}: no shipped preset for {stage!r} "
                          f"(known: {', '.join(presets_with(stage))})")
    path, whole = files[preset]
    data = _preset_section(stage, path, whole)
    for key, value in fields.items():
        if value is not None:
            set_path(data, key, value)
    data = apply_overrides(data, list(overrides or []))
    source = f"{path.relative_to(PRESETS_DIR)}" + ("" if whole else f" ({stage})") + " with the flow's parameters"
    get_stage(stage).validate(data, source=source)  # bad values first, before the store is read
    data = resolve_references(stage, data, hint=_form_hint(fields), log=flow_log)
    return get_stage(stage).validate(data, source=source)


def config_flow(stage: str, body: Callable[..., dict[str, Any]]) -> Any:
    """A flow named after the stage that takes the full typed config: what `run(config)` (the CLI) calls.
    The deployed flow of the same name takes a preset and a few fields instead and calls the same body."""
    return flow(name=stage, description=get_stage(stage).help)(body)


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes; never retry invalid input or a diverged run (retrying cannot help)."""
    try:
        state.result()
    except ConfigError:
        return False
    except JobFailed as exc:
        return exc.exit_code not in NOT_RETRIED_EXIT_CODES
    except Exception:
        return True
    return False


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


ERROR_LINE = re.compile(r"error|exception|traceback|diverged|failed", re.IGNORECASE)


class JobLogForwarder:
    """A job's output lines into the Prefect run's log (what the UI shows), throttled: at most `per_second`
    lines a second; lines that look like errors always pass; each throttled second ends with a count of the
    lines left out, and `close()` adds the last `tail` lines that were left out, so a run's log always ends
    with what the job printed last. The local and Kubernetes launchers both call it for each line."""

    def __init__(self, logger: Any, *, per_second: int = 20, tail: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.per_second, self.clock = logger, per_second, clock
        self.window, self.sent, self.dropped, self.dropped_total = clock(), 0, 0, 0
        self.recent: collections.deque[tuple[bool, str]] = collections.deque(maxlen=tail)

    def __call__(self, line: str) -> None:
        now = self.clock()
        if now - self.window >= 1.0:
            self._flush_count()
            self.window, self.sent = now, 0
        is_error = bool(ERROR_LINE.search(line))
        send = is_error or self.sent < self.per_second
        if send:
            self.sent += 1
            self.logger.log(logging.ERROR if is_error else logging.INFO, "%s", line)
        else:
            self.dropped += 1
        self.recent.append((send, line))

    def _flush_count(self) -> None:
        if self.dropped:
            self.logger.info("... %d job lines not shown (at most %d a second)", self.dropped, self.per_second)
            self.dropped_total += self.dropped
            self.dropped = 0

    def close(self) -> None:
        """Report the lines left out and forward the last ones that were."""
        self._flush_count()
        unsent = [line for sent, line in self.recent if not sent]
        if unsent:
            self.logger.info("last %d job lines not shown above:\n%s", len(unsent), "\n".join(unsent))
        self.recent.clear()


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_unless_bad_input)
def run_stage(stage: str, config: dict[str, Any], parent_run_id: str | None = None,
              resources: Resources | None = None, timeout_s: float | None = None) -> StageResult:
    """Run one stage as a job (or return its cached result); the job's log lines stream to stderr
    and (throttled, `JobLogForwarder`) to the Prefect task-run log the UI shows."""
    settings = get_settings()
    logger = get_run_logger()
    plan = get_stage(stage).plan(config, settings)
    cached = cached_result(plan)
    if cached is not None:
        logger.info("%s: output already exists at %s (cached)", stage, plan.output_uri)
        _echo(f"[{stage}] cached: {plan.output_uri}")
        return cached
    storage.write_json(plan.job_config_uri, job_payload(plan, parent_run_id=parent_run_id,
                                                        flow_run_id=flow_run.id))
    spec = JobSpec(
        stage=stage, name=plan.job_name, config_uri=plan.job_config_uri, result_uri=plan.result_uri,
        resources=resources or Resources(), timeout_s=timeout_s,
        env={PARENT_RUN_ENV: parent_run_id} if parent_run_id else {},
        labels={LABEL_STAGE: stage, LABEL_FLOW_RUN: str(flow_run.id or ""),
                LABEL_MLFLOW_RUN: parent_run_id or ""},
    )
    forward = JobLogForwarder(logger)

    def on_log(line: str) -> None:
        _echo(line)
        forward(line)

    launcher = get_launcher(settings)
    _echo(f"[{stage}] running as job {spec.name} ({launcher.name} launcher)")
    logger.info("%s: running as job %s (%s launcher)", stage, spec.name, launcher.name)
    try:
        return launcher.run(spec, on_log=on_log)
    finally:
        forward.close()


def convenience(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call `fn` (a Prefect artifact, an extra log): a failure is a warning, never a failed flow."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - conveniences never fail a run
        logging.getLogger(__name__).warning("could not create %s: %s", what, exc)


@contextlib.contextmanager
def stage_flow(stage: str, config: BaseModel, *, resources: Resources | None = None
               ) -> Iterator[tuple[Tracker, StageResult, dict[str, Any]]]:
    """The body every stage flow shares: a parent MLflow run with the config as params, the stage run as a
    job (`run_stage`), its summary (`summarize` of the stage's flow module) and metrics on the parent run.
    Yields (parent run, result, summary) for the flow's own tags and artifacts; the summary then starts
    with the parent run's id."""
    from flows.references import resolve_references
    from flows.registry import get as get_stage

    # a config given whole (`run(config)`) may still hold `latest:` references: resolved before it is planned
    data = resolve_references(stage, config.model_dump(mode="json"), hint=lambda path: f"set {path} to a URI",
                              log=flow_log)
    with parent_run(stage, params=data) as parent:
        result = run_stage(stage, data, parent.run_id, resources=resources)
        summary = get_stage(stage).flow_module.summarize(result)
        parent.log_metrics(result.metrics)
        yield parent, result, summary
    rest = dict(summary)
    summary.clear()
    summary.update({"parent_run_id": parent.run_id, **rest})


@contextlib.contextmanager
def parent_run(name: str, params: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """The flow's MLflow run (parent of every job's run), linked both ways with the Prefect flow run."""
    settings = get_settings()
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            "prefect.flow_run_url": f"{settings.prefect_ui_url.rstrip('/')}/runs/flow-run/{flow_run.id}"}
    tracker = create_run(name, tags=tags, settings=settings)
    if params:
        tracker.log_params(params)
    try:
        create_link_artifact(key="mlflow-run", link=run_url(tracker.run_id, settings),
                             link_text=f"MLflow run {tracker.run_id}",
                             description=f"MLflow parent run of this {name} flow run")
    except Exception as exc:  # the link is a convenience; never fail a flow for it
        logging.getLogger(__name__).warning("could not create the MLflow link artifact: %s", exc)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end(status)
