"""Models by reference: resolve, load, and trace what it cost to make them.

A model reference is one of
- a published model directory written by ``components.refs.checkpoint.save_model`` (the ``model``
  output of pretraining, RL or distillation) or one of their checkpoints (``.../checkpoints/step_N``);
- a stage output root holding ``RESULT.json`` (its model output is used);
- a directory in Hugging Face format of a supported family (``model_type`` ``deepseek_v3``, ``llama`` or
  ``qwen2``): a moeflow release, or one moeflow did not publish (a ``transformers`` ``save_pretrained``, a
  downloaded checkpoint); a local directory without a manifest is hashed file by file when a stage takes it
  as an input (``infra.plan.content_hash``), so lineage still holds;
- an MLflow Model Registry reference ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the model version's
  tag ``moeflow.model_uri`` names the release directory.

Where a model came from (its lineage, and what making it cost) is ``components.refs.lineage``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import storage
from infra.contract import RESULT_NAME, ConfigError

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
    kind: str  # "moeflow" (save_model layout or a checkpoint) or "hf" (a release or any HF directory)
    tokenizer_file: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def local_dir(uri: str, field: str | None = None) -> Path:
    """A local, verified copy of a published directory (in place when local), or a plain local directory.
    Anything else is a ConfigError, naming the config `field` the URI came from when given."""
    if storage.is_published(uri):
        return storage.fetch_dir(uri)
    path = Path(uri.removeprefix("file://"))
    if storage.is_remote(uri) or not path.is_dir():
        raise ConfigError(f"{field}: {uri} is not a published directory" if field
                          else f"{uri}: not a published model directory")
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
        from components.refs.lineage import lineage_dataset

        dataset = lineage_dataset(uri)
        tok_file = local_dir(dataset) / "tokenizer.json" if dataset else tok_file
        if not tok_file.is_file():
            raise ConfigError(f"{uri}: no tokenizer.json next to the model, and its lineage names no dataset")
    from components.model.dense_config import is_hf_config
    from components.refs.checkpoint import load_model

    kind = "hf" if is_hf_config(json.loads(cfg_file.read_text())) else "moeflow"
    try:
        model, _ = load_model(path)  # a config or weights that do not fit: a ConfigError naming the path
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    tokenizer = Tokenizer.from_file(str(tok_file))
    manifest = storage.read_manifest(uri) if storage.is_published(uri) else None
    meta = dict(getattr(manifest, "meta", None) or {})
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, cfg=model.cfg, path=path, kind=kind, meta=meta,
                       tokenizer_file=tok_file)
