"""Where a model came from: the stage outputs it descends from, walked once, for every stage that asks.

- ``stage_result_of(uri)`` / ``stage_inputs_of(uri)``: the ``RESULT.json`` (or, while it runs, the job config)
  of the stage that published ``uri``, and its inputs;
- ``lineage_chain(uri)`` walks up from an output: each published output's manifest carries its stage's
  lineage (inputs with URIs and hashes, git commit, config, MLflow run id, Prefect flow-run id), and the
  stage's ``RESULT.json`` beside it carries its metrics and duration. Every ancestor appears once;
- ``lineage_dataset(uri)``: the prepared dataset a model descends from;
- ``lineage_cost(uri)``: the device-hours and cost of every stage in the chain: the pretraining ledger's
  ``device_hours`` / ``cost_usd`` when a stage reports them, else its wall-clock seconds on its devices
  (flagged estimated).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from infra import storage
from infra.contract import JOB_CONFIG_NAME, RESULT_NAME, ConfigError
from infra.plan import content_hash

log = logging.getLogger(__name__)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def stage_result_of(uri: str) -> dict[str, Any] | None:
    """The RESULT.json of the stage that published ``uri`` (looked up in its parent directories)."""
    probe = uri.rstrip("/")
    for _ in range(3):  # <out>/model, <out>/checkpoints/step_N
        probe = _parent(probe)
        if not probe or probe.endswith(":/") or probe.endswith(":"):
            return None
        candidate = storage.join_uri(probe, RESULT_NAME)
        if storage.exists(candidate):
            return storage.read_json(candidate)
    return None


def stage_inputs_of(uri: str) -> dict[str, str]:
    """{input name: URI} of the stage that wrote ``uri``: from its RESULT.json, or, while the stage still
    runs (a checkpoint of an unfinished run), from its job config."""
    result = stage_result_of(uri)
    if result is not None:
        inputs = (result.get("lineage") or {}).get("inputs") or {}
        return {n: i["uri"] for n, i in inputs.items() if isinstance(i, dict) and i.get("uri")}
    probe = uri.rstrip("/")
    for _ in range(3):
        probe = _parent(probe)
        if not probe or probe.endswith(":/") or probe.endswith(":"):
            break
        candidate = storage.join_uri(probe, JOB_CONFIG_NAME)
        if storage.exists(candidate):
            return dict(storage.read_json(candidate).get("inputs") or {})
    return {}


def lineage_dataset(uri: str, max_depth: int = 8) -> str | None:
    """The prepared dataset a model descends from (the first ``dataset`` input up its lineage)."""
    frontier, depth = [uri], 0
    while frontier and depth <= max_depth:
        nxt = []
        for u in frontier:
            inputs = stage_inputs_of(u)
            if inputs.get("dataset"):
                return inputs["dataset"]
            nxt.extend(inputs.values())
        frontier, depth = nxt, depth + 1
    return None


def norm_uri(uri: str) -> str:
    """A comparable form of a URI: local paths absolute, no `file://`, no trailing slash."""
    uri = str(uri).rstrip("/")
    if storage.is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _manifest(uri: str) -> storage.Manifest | None:
    try:
        return storage.read_manifest(uri)
    except (storage.StorageError, OSError):
        return None


def _stage_result(uri: str) -> dict[str, Any] | None:
    try:
        return stage_result_of(uri)
    except (storage.StorageError, OSError, ValueError):
        return None


def _current_hash(uri: str) -> str | None:
    try:
        return content_hash(uri)
    except (ConfigError, storage.StorageError, OSError):
        return None


def describe_output(uri: str, recorded_hash: str | None = None) -> dict[str, Any]:
    """One link of the chain: the output at `uri`, its hash, and the stage that made it."""
    manifest = _manifest(uri)
    meta = dict(manifest.meta) if manifest is not None else {}
    result = _stage_result(uri)
    lineage = meta.get("lineage") or (result or {}).get("lineage") or {}
    current = ("manifest:" + manifest.digest()) if manifest is not None else _current_hash(uri)
    inputs = {}
    for name, inp in sorted((lineage.get("inputs") or {}).items()):
        if isinstance(inp, dict):
            inputs[name] = {"uri": inp.get("uri"), "hash": inp.get("hash")}
    entry: dict[str, Any] = {
        "uri": uri,
        "kind": meta.get("kind") or ("file" if manifest is None else None),
        "hash": current,
        "hash_matches_lineage": None if recorded_hash is None or current is None else recorded_hash == current,
        "stage": lineage.get("stage") or (result or {}).get("stage"),
        "key": lineage.get("key"),
        "git_commit": lineage.get("git_commit"),
        "mlflow_run_id": lineage.get("mlflow_run_id") or (result or {}).get("mlflow_run_id"),
        "parent_mlflow_run_id": lineage.get("parent_mlflow_run_id"),
        "prefect_flow_run_id": lineage.get("prefect_flow_run_id"),
        "inputs": inputs,
        "metrics": dict((result or {}).get("metrics") or {}),
        "seconds": (result or {}).get("seconds"),
        "devices": int(((lineage.get("config") or {}).get("resources") or {}).get("procs_per_node") or 1),
    }
    if entry["stage"] == "pretrain" and manifest is not None and "training.json" in manifest.files:
        try:
            training = storage.read_json(storage.join_uri(uri, "training.json"))
            entry["ledger"] = dict(training.get("ledger") or {})
        except (storage.StorageError, OSError, AttributeError) as exc:
            log.warning("%s: unreadable training.json: %s", uri, exc)
    return entry


def lineage_chain(uri: str, *, max_depth: int = 16) -> list[dict[str, Any]]:
    """Every output `uri` descends from, `uri` first, breadth-first, each once (see `describe_output`)."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier: list[tuple[str, str | None]] = [(uri, None)]
    for _ in range(max_depth + 1):
        nxt: list[tuple[str, str | None]] = []
        for u, recorded in frontier:
            k = norm_uri(u)
            if k in seen:
                continue
            seen.add(k)
            entry = describe_output(u, recorded)
            chain.append(entry)
            nxt.extend((inp["uri"], inp.get("hash")) for inp in entry["inputs"].values() if inp.get("uri"))
        frontier = nxt
        if not frontier:
            break
    return chain


def lineage_cost(uri: str, *, price_per_device_hour: float = 2.0, max_depth: int = 8) -> dict[str, Any]:
    """Device-hours and cost of every stage in the lineage of ``uri`` (each stage counted once).

    Returns ``{"device_hours", "cost_usd", "estimated": bool, "stages": [{"stage", "key", "device_hours",
    "cost_usd", "source"}]}``; ``source`` is "ledger" (the stage reported device_hours/cost_usd) or
    "seconds" (wall-clock seconds x devices, priced at ``price_per_device_hour``).
    """
    seen: set[str] = set()
    stages: list[dict[str, Any]] = []
    for entry in lineage_chain(uri, max_depth=max_depth):
        if entry["stage"] is None or entry["seconds"] is None and not entry["metrics"]:
            continue  # not a stage's output (a plain input file), or its stage left no result
        key = str(entry["key"] or entry["stage"])
        if key in seen:
            continue
        seen.add(key)
        m = entry["metrics"]
        if "device_hours" in m:
            hours, source = float(m["device_hours"]), "ledger"
            cost = float(m.get("cost_usd", hours * price_per_device_hour))
        else:
            hours, source = float(entry["seconds"] or 0.0) * entry["devices"] / 3600.0, "seconds"
            cost = hours * price_per_device_hour
        stages.append({"stage": entry["stage"], "key": key[:16], "device_hours": hours, "cost_usd": cost,
                       "source": source})
    return {"device_hours": sum(s["device_hours"] for s in stages), "cost_usd": sum(s["cost_usd"] for s in stages),
            "estimated": any(s["source"] == "seconds" for s in stages), "stages": stages}
