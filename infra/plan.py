"""Content addressing: validate a stage's config, hash its inputs, derive where it writes, find a cached run,
list a stage's complete runs in the store (`published_results`, what `latest:<stage>` references read).

The output location of a stage run is derived from the hash of its config and its inputs' hashes, so
running the same thing twice finds the first result (`RESULT.json`, written last) and returns at once.
The stage itself arrives as a `StageImpl` (its `Config` and `input_uris`), handed in by the top layer's
registry: nothing here imports a stage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from infra import storage
from infra.contract import JOB_CONFIG_NAME, RESULT_NAME, ConfigError, StageImpl, StageResult
from infra.settings import Settings, get_settings

KEY_VERSION = "2"  # bump when the meaning of stage outputs changes incompatibly (2: RESULT.json carries `extra`)


def validate_config(stage: str, config_class: type[BaseModel], data: dict[str, Any], *,
                    source: str = "config", overrides: Sequence[str] = ()) -> BaseModel:
    """Validate a stage config; errors name each offending field (`source: stage.field.path: message`),
    where `source` is the `--set key=value` that set the field when one of `overrides` did."""
    try:
        return config_class.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            lines.append(f"{_source_of(loc, source, overrides)}: {stage}.{loc}: {err['msg']}{got}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _source_of(loc: str, source: str, overrides: Sequence[str]) -> str:
    """`--set key=value` when that override set the field at `loc` (or a field around it), else `source`."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return f"--set {item}"
    return source


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _tree_hash(uri: str) -> str:
    """SHA-256 over (relative path, SHA-256) of every file under a plain directory / prefix (symlinks refused)."""
    prefix = storage.join_uri(uri, "x")[:-1]
    h = hashlib.sha256()
    for file_uri in storage.list_uris(uri):
        with storage.open_read(file_uri) as f:
            fh = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 - f is the loop's own file
                fh.update(chunk)
        h.update(f"{file_uri[len(prefix):]}\0{fh.hexdigest()}\n".encode())
    return "tree:" + h.hexdigest()


def content_hash(uri: str) -> str:
    """The content hash of an input: a published output's manifest digest, a file's SHA-256, or for a plain
    directory (a prep source of many files) the hash of its files' paths and SHA-256s."""
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if path.is_file():
            return "sha256:" + storage.sha256_file(path)
        if not path.exists():
            raise ConfigError(f"input {uri} does not exist")
    manifest = storage.read_manifest(uri)
    if manifest is not None:
        return "manifest:" + manifest.digest()
    try:
        if storage.list_uris(uri):
            return _tree_hash(uri)
    except storage.StorageError as exc:  # a symlink or FIFO in the directory, an unreadable file
        raise ConfigError(f"input {uri}: {exc}") from None
    if not storage.is_remote(uri):
        raise ConfigError(f"input {uri} is an empty directory")
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


def plan_stage(stage: str, impl: StageImpl, data: dict[str, Any], settings: Settings | None = None,
               *, source: str = "config", overrides: Sequence[str] = ()) -> StagePlan:
    """Validate the config, hash its inputs and derive the content-addressed output location."""
    settings = settings or get_settings()
    cfg = validate_config(stage, impl.Config, data, source=source, overrides=overrides)
    inputs = dict(impl.input_uris(cfg))
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


@dataclass(frozen=True)
class PublishedOutput:
    """One complete run of a stage found in the store (see `published_results`)."""

    uri: str  # <store>/<stage>/<key[:16]>
    result: StageResult
    published: datetime  # the newest `created` among its outputs' manifests


def published_results(stage: str, settings: Settings | None = None) -> list[PublishedOutput]:
    """The complete, published runs of `stage` in the store, newest first.

    A run counts once its `RESULT.json` (written last by the job) is there and every output it names is
    still published (the test `cached_result` applies): a running, failed or half-deleted run does not.
    Newest means published last: the latest `created` time among its outputs' manifests (ties: the folder
    name, so the order is stable)."""
    settings = settings or get_settings()
    root = storage.join_uri(settings.store_uri, stage)
    found = []
    for name in storage.list_dirs(root):
        uri = storage.join_uri(root, name)
        try:
            result = StageResult.model_validate(storage.read_json(storage.join_uri(uri, RESULT_NAME)))
            manifests = [storage.read_manifest(out) for out in result.outputs.values()]
        except (FileNotFoundError, ValueError, storage.StorageError):
            continue  # not finished, not a stage output, or a broken manifest
        if manifests and all(m is not None for m in manifests):
            published = max(datetime.fromisoformat(m.created) for m in manifests if m is not None)
            found.append(PublishedOutput(uri, result, published))
    return sorted(found, key=lambda p: (p.published, p.uri), reverse=True)


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


