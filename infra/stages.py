"""Stages: the registry, content addressing, and the job config that travels by URI.

A stage is a module in `components/` exposing
- `Config`: a pydantic model (the stage's typed config; the Prefect UI renders it as a form),
- `input_uris(cfg) -> dict[str, str]`: the URIs the stage reads (their content hashes enter its key),
- `run(cfg, ctx: StageContext) -> StageOutput`: the work itself, publishing outputs under
  `ctx.output_uri`.

The output location of a stage run is derived from the hash of its config and its inputs' hashes, so
running the same thing twice finds the first result (`RESULT.json`, written last) and returns at once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from infra import storage
from infra.jobs import StageResult
from infra.settings import Settings, get_settings

STAGES: dict[str, str] = {
    "prep": "components.data.stage",
    "pretrain": "components.training.stage",
    "rl": "components.rl.stage",
    "distill": "components.distill.stage",
    "eval": "components.eval.stage",
    "release": "components.release.stage",
}
RESULT_NAME = "RESULT.json"
JOB_CONFIG_NAME = "job.json"
KEY_VERSION = "1"  # bump when the meaning of stage outputs changes incompatibly


class ConfigError(ValueError):
    """Bad user input in a config: the message names the field (or file:line) and what to change."""


def stage_module(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[stage])


def validate_config(stage: str, data: dict[str, Any], *, source: str = "config") -> BaseModel:
    """Validate a stage config; errors name each offending field (`source: field.path: message`)."""
    mod = stage_module(stage)
    try:
        return mod.Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            lines.append(f"{source}: {stage}.{loc}: {err['msg']}{got}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(uri: str) -> str:
    """The content hash of an input: a published output's manifest digest, or a file's SHA-256."""
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if path.is_file():
            return "sha256:" + storage.sha256_file(path)
        if not path.exists():
            raise ConfigError(f"input {uri} does not exist")
    manifest = storage.read_manifest(uri)
    if manifest is not None:
        return "manifest:" + manifest.digest()
    if not storage.is_remote(uri):
        raise ConfigError(f"input {uri} is a directory without a {storage.MANIFEST_NAME}: "
                          "not a published output")
    try:
        with storage.open_read(uri) as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
    except storage.StorageError as exc:
        raise ConfigError(f"input {uri} does not exist or cannot be read: {exc}") from None


def stage_key(stage: str, cfg: BaseModel, input_hashes: dict[str, str]) -> str:
    payload = {"v": KEY_VERSION, "stage": stage, "config": cfg.model_dump(mode="json"),
               "inputs": input_hashes}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass
class StagePlan:
    """Everything decided before a stage runs: where it writes, and its lineage."""

    stage: str
    config: dict[str, Any]
    key: str
    output_uri: str
    input_hashes: dict[str, str]
    inputs: dict[str, str]

    @property
    def result_uri(self) -> str:
        return storage.join_uri(self.output_uri, RESULT_NAME)

    @property
    def job_config_uri(self) -> str:
        return storage.join_uri(self.output_uri, JOB_CONFIG_NAME)

    @property
    def job_name(self) -> str:
        return f"moeflow-{self.stage}-{self.key[:10]}"


def plan_stage(stage: str, data: dict[str, Any], settings: Settings | None = None,
               *, source: str = "config") -> StagePlan:
    """Validate the config, hash its inputs and derive the content-addressed output location."""
    settings = settings or get_settings()
    cfg = validate_config(stage, data, source=source)
    inputs = dict(stage_module(stage).input_uris(cfg))
    hashes = {name: content_hash(uri) for name, uri in sorted(inputs.items())}
    key = stage_key(stage, cfg, hashes)
    out = storage.join_uri(settings.store_uri, stage, key[:16])
    return StagePlan(stage, cfg.model_dump(mode="json"), key, out, hashes, inputs)


def cached_result(plan: StagePlan) -> StageResult | None:
    """The result of an earlier identical run, if it finished and all its outputs are still published."""
    if not storage.exists(plan.result_uri):
        return None
    result = StageResult.model_validate(storage.read_json(plan.result_uri))
    for uri in result.outputs.values():
        if not storage.is_published(uri):
            return None
    return result.model_copy(update={"cached": True, "seconds": 0.0})


@dataclass
class StageOutput:
    """What `run()` returns: output URIs (each published) and headline metrics."""

    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a running stage gets from the platform."""

    stage: str
    output_uri: str
    workdir: Path
    tracker: Any  # infra.tracking.Tracker on rank 0, a no-op tracker elsewhere
    lineage: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    settings: Settings = field(default_factory=get_settings)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class NullTracker:
    """Tracker for ranks other than 0: every call is a no-op."""

    run_id: str | None = None

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def job_payload(plan: StagePlan, *, parent_run_id: str | None, flow_run_id: str | None) -> dict[str, Any]:
    return {
        "stage": plan.stage,
        "config": plan.config,
        "key": plan.key,
        "output_uri": plan.output_uri,
        "result_uri": plan.result_uri,
        "inputs": plan.inputs,
        "input_hashes": plan.input_hashes,
        "parent_run_id": parent_run_id,
        "prefect_flow_run_id": flow_run_id,
    }


def dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 outside torchrun)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
