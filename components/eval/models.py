"""Models by reference: resolve, load, and trace what it cost to make them.

A model reference is one of
- a published model directory written by ``components.training.checkpoint.save_model`` (the ``model``
  output of pretraining, RL or distillation) or one of their checkpoints (``.../checkpoints/step_N``);
- a stage output root holding ``RESULT.json`` (its model output is used);
- a release directory in Hugging Face format (``config.json`` with ``model_type: deepseek_v3``);
- an MLflow Model Registry reference ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the model version's
  tag ``moeflow.model_uri`` names the release directory.

``lineage_cost`` follows ``RESULT.json`` files up the lineage (each stage's inputs) and adds up the
device-hours and cost of every stage that made the model: the pretraining ledger's ``device_hours`` /
``cost_usd`` when a stage reports them, else its wall-clock seconds on its devices (flagged estimated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import storage
from infra.stages import JOB_CONFIG_NAME, RESULT_NAME, ConfigError

REGISTRY_PREFIX = "models:/"
MODEL_URI_TAG = "moeflow.model_uri"
# output names under which stages publish a model, most specific first
MODEL_OUTPUT_KEYS = ("student", "model", "policy", "checkpoint", "release")


def resolve_model_ref(ref: str) -> str:
    """The storage URI a reference points at (registry references are looked up; others unchanged)."""
    if not ref.startswith(REGISTRY_PREFIX):
        return _from_stage_root(ref)
    from mlflow.exceptions import MlflowException

    from infra.tracking import _client

    body = ref[len(REGISTRY_PREFIX):]
    client = _client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise ConfigError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as exc:
        raise ConfigError(f"{ref}: not found in the MLflow Model Registry ({exc.message})") from None
    uri = (mv.tags or {}).get(MODEL_URI_TAG)
    if not uri:
        raise ConfigError(f"{ref}: model version {mv.version} of {mv.name!r} has no tag {MODEL_URI_TAG} "
                          "(register releases with `moeflow release`)")
    return uri


def registry_version(ref: str) -> str | None:
    """The version number a registry reference resolves to now (None for other references)."""
    if not ref.startswith(REGISTRY_PREFIX) or "@" not in ref:
        return ref.rsplit("/", 1)[-1] if ref.startswith(REGISTRY_PREFIX) else None
    from infra.tracking import _client

    name, alias = ref[len(REGISTRY_PREFIX):].split("@", 1)
    return str(_client().get_model_version_by_alias(name, alias).version)


def _from_stage_root(uri: str) -> str:
    """A stage output root -> its published model output; anything else unchanged."""
    result_uri = storage.join_uri(uri, RESULT_NAME)
    if storage.is_published(uri) or not storage.exists(result_uri):
        return uri
    outputs = storage.read_json(result_uri).get("outputs", {})
    for key in MODEL_OUTPUT_KEYS:
        if key in outputs:
            return outputs[key]
    raise ConfigError(f"{uri}: stage output has no model among its outputs {sorted(outputs)}")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    cfg: Any
    path: Path
    kind: str  # "moeflow" (save_model layout or a checkpoint) or "hf" (release)
    tokenizer_file: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def local_dir(uri: str) -> Path:
    """A local, verified copy of a published directory (in place when local), or a plain local path."""
    if storage.is_published(uri):
        return storage.fetch_dir(uri)
    path = Path(uri.removeprefix("file://"))
    if storage.is_remote(uri) or not path.is_dir():
        raise ConfigError(f"{uri}: not a published model directory")
    return path


def load_model_ref(uri: str) -> LoadedModel:
    """Load a model (in eval mode) and its tokenizer from a resolved URI (see ``resolve_model_ref``)."""
    from tokenizers import Tokenizer

    path = local_dir(uri)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{uri}: no config.json; not a model directory")
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():  # a training checkpoint: the tokenizer is its dataset's
        dataset = lineage_dataset(uri)
        tok_file = local_dir(dataset) / "tokenizer.json" if dataset else tok_file
        if not tok_file.is_file():
            raise ConfigError(f"{uri}: no tokenizer.json next to the model, and its lineage names no dataset")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") == "deepseek_v3":
        from components.model import load_pretrained

        model = load_pretrained(path)
        kind = "hf"
    else:
        from components.training.checkpoint import load_model

        model, _ = load_model(path)
        kind = "moeflow"
    tokenizer = Tokenizer.from_file(str(tok_file))
    manifest = storage.read_manifest(uri) if storage.is_published(uri) else None
    meta = dict(getattr(manifest, "meta", None) or {})
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, cfg=model.cfg, path=path, kind=kind, meta=meta,
                       tokenizer_file=tok_file)


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


def lineage_cost(uri: str, *, price_per_device_hour: float = 2.0, max_depth: int = 8) -> dict[str, Any]:
    """Device-hours and cost of every stage in the lineage of ``uri`` (each stage counted once).

    Returns ``{"device_hours", "cost_usd", "estimated": bool, "stages": [{"stage", "key", "device_hours",
    "cost_usd", "source"}]}``; ``source`` is "ledger" (the stage reported device_hours/cost_usd) or
    "seconds" (wall-clock seconds x devices, priced at ``price_per_device_hour``).
    """
    seen: set[str] = set()
    stages: list[dict[str, Any]] = []

    def visit(u: str, depth: int) -> None:
        if depth > max_depth:
            return
        result = stage_result_of(u)
        if result is None:
            return
        lineage = result.get("lineage") or {}
        key = str(lineage.get("key") or result.get("stage"))
        if key in seen:
            return
        seen.add(key)
        m = result.get("metrics") or {}
        if "device_hours" in m:
            hours, source = float(m["device_hours"]), "ledger"
            cost = float(m.get("cost_usd", hours * price_per_device_hour))
        else:
            devices = int((lineage.get("config") or {}).get("resources", {}).get("procs_per_node", 1) or 1)
            hours, source = float(result.get("seconds") or 0.0) * devices / 3600.0, "seconds"
            cost = hours * price_per_device_hour
        stages.append({"stage": result.get("stage"), "key": key[:16], "device_hours": hours, "cost_usd": cost,
                       "source": source})
        for inp in (lineage.get("inputs") or {}).values():
            if isinstance(inp, dict) and inp.get("uri"):
                visit(inp["uri"], depth + 1)

    visit(uri, 0)
    return {"device_hours": sum(s["device_hours"] for s in stages), "cost_usd": sum(s["cost_usd"] for s in stages),
            "estimated": any(s["source"] == "seconds" for s in stages), "stages": stages}


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
