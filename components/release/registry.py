"""The MLflow Model Registry side of a release.

Contract (``components.refs.models.resolve_model_ref`` relies on it): every model version moeflow
registers carries the tags
- ``moeflow.model_uri``: the release directory's URI (local path or ``s3://``),
- ``moeflow.release_sha256``: the digest of the release's ``MANIFEST.json`` (``Manifest.digest()``),
- ``moeflow.metrics``: the evaluation metrics as JSON (what the next release's gate compares against),
- ``moeflow.gate``: the gate decision as JSON.
Its ``source`` is the MLflow logged model of the release (``models:/<model_id>``, `log_release_model`): a
pyfunc model (``components/release/mlflow_model.py``) carrying the whole release directory as its artifact
``release``, linked to the release job's run. So ``mlflow.pyfunc.load_model("models:/<name>@champion")``
generates, and ``mlflow.artifacts.download_artifacts`` of the version holds a directory ``transformers``
loads (``<download>/artifacts/release``). Without a run (tests, scripts) the source is the release URI.

Aliases: ``candidate`` moves to every new version; ``champion`` only when the gate passes.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from infra import storage

log = logging.getLogger(__name__)

MODEL_URI_TAG = "moeflow.model_uri"
RELEASE_SHA_TAG = "moeflow.release_sha256"
METRICS_TAG = "moeflow.metrics"
GATE_TAG = "moeflow.gate"
LOGGED_MODEL_NAME = "model"
RELEASE_ARTIFACT = "release"
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
CANDIDATE = "candidate"
CHAMPION = "champion"


def _client(settings=None):
    from infra.tracking import _client as tracking_client

    return tracking_client(settings)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def alias_version(name: str, alias: str, *, client=None) -> str | None:
    """The version number an alias points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    aliases = rm.aliases or {}
    v = aliases.get(alias)
    return None if v is None else str(v)


def version_info(name: str, version: str, *, client=None) -> dict[str, Any]:
    """``{"version", "model_uri", "release_sha256", "metrics", "aliases"}`` of a model version. Metrics come
    from its ``moeflow.metrics`` tag, else from its release's manifest (``meta.evaluation.metrics``)."""
    client = client or _client()
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    if tags.get(METRICS_TAG):
        try:
            metrics = {k: float(v) for k, v in json.loads(tags[METRICS_TAG]).items()}
        except (ValueError, TypeError, AttributeError):
            log.warning("model version %s/%s: unreadable %s tag", name, version, METRICS_TAG)
    uri = tags.get(MODEL_URI_TAG)
    if not metrics and uri:
        try:
            manifest = storage.read_manifest(uri)
            metrics = dict(((manifest.meta if manifest else {}).get("evaluation") or {}).get("metrics") or {})
        except storage.StorageError as exc:
            log.warning("model version %s/%s: cannot read %s: %s", name, version, uri, exc)
    return {"version": str(mv.version), "model_uri": uri, "release_sha256": tags.get(RELEASE_SHA_TAG),
            "metrics": metrics, "aliases": list(getattr(mv, "aliases", None) or [])}


def current_champion(name: str, *, client=None) -> dict[str, Any] | None:
    """The champion's `version_info`, or None when the model or its champion alias does not exist."""
    client = client or _client()
    version = alias_version(name, CHAMPION, client=client)
    return None if version is None else version_info(name, version, client=client)


def _tracking_uri(client):
    """MLflow's fluent functions (logging a model, resolving ``models:/<model_id>``) use the global tracking
    URI: point it at `client`'s for the duration."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(client._tracking_client.tracking_uri)


def _signature(release_dir: Path):
    """Input: strings (one prompt each); output: a string; params: the sampling settings, their defaults
    those of the release's ``generation_config.json``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    gen = json.loads((release_dir / "generation_config.json").read_text())
    params = [ParamSpec("max_new_tokens", "long", int(gen.get("max_new_tokens") or 64)),
              ParamSpec("do_sample", "boolean", bool(gen.get("do_sample", False))),
              ParamSpec("temperature", "double", float(gen.get("temperature") or 1.0)),
              ParamSpec("top_p", "double", float(gen.get("top_p") or 1.0)),
              ParamSpec("raw", "boolean", False)]
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema(params))


def log_release_model(release_dir: str | Path, *, run_id: str, name: str, client=None) -> str:
    """Log the release directory as an MLflow logged model linked to `run_id` (the pyfunc of
    ``mlflow_model.py`` with the directory as artifact ``release``) and return its ``model_id``.
    The logged model lives in the run's experiment and under its artifact root (file store or S3)."""
    import mlflow
    from mlflow.models import Model
    client = client or _client()
    release_dir = Path(release_dir)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                        model_type="release", tags={"moeflow.release": name})
    requirements = [f"mlflow=={mlflow.__version__}", "torch", "transformers", "safetensors", "tokenizers"]
    # MLflow advises predict type hints and an input example while it logs (the signature is given, and an
    # example would make it load and run the model): recorded, at debug level, not printed in the job's output.
    with _tracking_uri(client), warnings.catch_warnings(record=True) as advice:
        Model.log(artifact_path=None, name=LOGGED_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                  model_id=logged.model_id, python_model=str(PYFUNC_CODE),
                  artifacts={RELEASE_ARTIFACT: str(release_dir)}, signature=_signature(release_dir),
                  pip_requirements=requirements)
    for w in advice:
        log.debug("MLflow, logging the release model: %s", w.message)
    return logged.model_id


def register_release(name: str, *, release_uri: str, release_sha256: str, run_id: str | None,
                     metrics: dict[str, float], gate: dict[str, Any] | None = None,
                     description: str | None = None, extra_tags: dict[str, str] | None = None,
                     model_id: str | None = None, client=None) -> str:
    """Register the release as a new version of `name` (created if needed), point `candidate` at it,
    and return the version number. The source is the logged model `model_id` (`log_release_model`) when
    given, else the release URI itself (fine for S3 and the embedded store; a tracking server refuses a
    local path outside the run's artifacts)."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        client.create_registered_model(
            name, description="DeepSeek-architecture models released by moeflow (MIT).",
            tags={"moeflow.kind": "release"})
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        MODEL_URI_TAG: release_uri,
        RELEASE_SHA_TAG: release_sha256,
        METRICS_TAG: json.dumps({k: float(v) for k, v in sorted(metrics.items())}),
    }
    if gate is not None:
        tags[GATE_TAG] = json.dumps(_gate_summary(gate), default=str)
    tags.update(extra_tags or {})
    source = f"models:/{model_id}" if model_id else release_uri
    with _tracking_uri(client):  # the registry looks the logged model up through the global tracking URI
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description,
                                         model_id=model_id)
    version = str(mv.version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def promote(name: str, version: str, *, client=None) -> None:
    """Point `champion` at `version`."""
    (client or _client()).set_registered_model_alias(name, CHAMPION, version)


def set_gate_tag(name: str, version: str, gate: dict[str, Any], *, client=None) -> None:
    (client or _client()).set_model_version_tag(name, version, GATE_TAG, json.dumps(_gate_summary(gate),
                                                                                     default=str))


def _gate_summary(gate: dict[str, Any]) -> dict[str, Any]:
    champion = gate.get("champion") or {}
    return {"passed": gate.get("passed"), "promoted": gate.get("promoted"), "reasons": gate.get("reasons", []),
            "min": gate.get("min"), "max": gate.get("max"), "compare": gate.get("compare"),
            "champion_version": champion.get("version")}
