"""The `release` stage: a trained model (and its evaluation) in, a published, registered release out.

Runs inside `moeflow-job release`:
1. load the model (any model reference: a model URI, a stage output, a release, models:/NAME@ALIAS) and
   its evaluation (a report row and/or metrics from the config);
2. read the lineage chain and its efficiency ledger, and the registry's current champion;
3. decide the gate (`components.release.gate`), build the release directory (`build.build_release`);
4. publish it to `<output>/release` (MANIFEST.json last), verify the published copy
   (`verify.verify_release`; a release that fails is unpublished again and the stage fails);
5. log it as an MLflow model of the job's run (`registry.log_release_model`: a pyfunc carrying the release
   directory), register that logged model as a new model version with alias `candidate`, and point
   `champion` at it if the gate passed (re-checked against the champion of that moment).
Outputs: `{"release": <release URI>}`; the final gate decision is also written to `<output>/gate.json`
(the copy inside the release's manifest and card is the one taken before registration). Metrics:
`gate_passed`, `promoted`, `model_version`, `champion_version` (the champion the gate compared against),
parameter counts, sizes, the logit differences of the export and of the verification, and the
evaluation metrics (`eval/<name>`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from infra import storage
from infra.contract import RESULT_NAME, ConfigError, StageContext, StageOutput
from infra.tracking import metric_key

from . import registry
from .config import ReleaseConfig

Config = ReleaseConfig
log = logging.getLogger("moeflow.release")
GATE_NAME = "gate.json"


def _report_input(uri: str) -> str:
    """An eval stage output root -> its published report directory; anything else unchanged."""
    result_uri = storage.join_uri(uri, RESULT_NAME)
    if uri.endswith(".json") or storage.is_published(uri) or not storage.exists(result_uri):
        return uri
    report = (storage.read_json(result_uri).get("outputs") or {}).get("report")
    if not report:
        raise ConfigError(f"release.eval_report: {uri} is a stage output without a 'report' output")
    return report


def input_uris(cfg: ReleaseConfig) -> dict[str, str]:
    from components.refs.models import resolve_model_ref

    if not cfg.model:
        raise ConfigError("release.model: no model given; set it to the model to release (a model URI such as "
                          "<store>/distill/<key>/student, a stage output, models:/NAME@ALIAS, or latest:rl for "
                          "the newest RL policy in the store): the field `model` of the release form, or "
                          "--set model=... on the command line")
    uris = {"model": resolve_model_ref(cfg.model)}
    if cfg.eval_report:
        uris["eval_report"] = _report_input(cfg.eval_report)
    return uris


def load_source_model(uri: str) -> tuple[Any, Path]:
    """(model in eval mode, local directory holding its files) for a published model or release."""
    from components.refs.checkpoint import load_model
    from components.refs.models import local_dir

    path = local_dir(uri)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"release.model: {uri} has no config.json; not a model directory")
    try:
        model, _ = load_model(path)
    except (ConfigError, FileNotFoundError) as exc:
        raise ConfigError(f"release.model: {exc}") from None
    return model.eval(), path


def run(cfg: ReleaseConfig, ctx: StageContext) -> StageOutput:
    from components.refs.lineage import lineage_chain, norm_uri

    from .build import build_release, publish_release
    from .card import ReleaseCard
    from .evidence import efficiency_ledger, load_evaluation
    from .gate import evaluate_gate
    from .verify import verify_release

    inputs = ctx.inputs
    model_uri = inputs["model"]
    model, model_dir = load_source_model(model_uri)
    evaluation = load_evaluation(inputs.get("eval_report"), model_uris=[model_uri, cfg.model or ""],
                                 row_name=cfg.eval_model, explicit=cfg.metrics)
    chain = lineage_chain(model_uri)
    ledger = efficiency_ledger(chain)
    champion = registry.current_champion(cfg.name) if cfg.register_model else None
    gate = evaluate_gate(cfg.gate, evaluation["metrics"], champion, registry=cfg.register_model)
    gate["promoted"] = bool(gate["passed"] and cfg.gate.promote and cfg.register_model)
    log.info("gate %s%s", "passed" if gate["passed"] else "failed",
             "" if gate["passed"] else ": " + "; ".join(gate["reasons"]))

    card = ReleaseCard(
        name=cfg.name, model_cfg=model.cfg, license_holder=cfg.license.holder,
        license_year=cfg.license.resolved_year(), source_uri=model_uri, title=cfg.title,
        description=cfg.description, evaluation=evaluation, gate=gate, ledger=ledger, chain=chain,
        release_lineage=ctx.lineage, intended_use=cfg.intended_use, limitations=cfg.limitations, dtype=cfg.dtype)
    local = ctx.workdir / "release"
    shutil.rmtree(local, ignore_errors=True)
    built = build_release(model, local, tokenizer_dir=model_dir, card=card, dtype=cfg.dtype,
                          max_shard_bytes=int(cfg.max_shard_gb * 1024**3), atol=cfg.atol)
    info = built["model_info"]
    release_uri = storage.join_uri(ctx.output_uri, "release")
    meta = {
        "name": cfg.name,
        "lineage": ctx.lineage,
        "source_model_uri": model_uri,
        "evaluation": {k: evaluation[k] for k in ("metrics", "sources", "report_uri", "row", "evaluated_uri")},
        "gate": dict(gate),
        "model": {"total_params": info["total_params"], "active_params": info["active_params"],
                  "dense": model.cfg.n_moe_layers == 0, "dtype": cfg.dtype},
    }
    manifest = publish_release(local, release_uri, meta=meta)
    digest = manifest.digest()
    log.info("release published at %s (manifest digest %s)", release_uri, digest[:16])

    check = verify_release(release_uri, atol=cfg.atol)
    if not check["ok"]:
        storage.delete_file(storage.join_uri(release_uri, storage.MANIFEST_NAME))  # unpublish
        failed = [f"{c['name']}: {c['detail']}" for c in check["checks"] if not c["ok"]]
        raise RuntimeError("the published release failed verification (unpublished again):\n  " + "\n  ".join(failed))
    log.info("release verified: max |moeflow - transformers| logit difference %.3g", check["max_abs_diff"])

    ctx.tracker.set_tags({"moeflow.release_uri": release_uri, "moeflow.release_sha256": digest,
                          "mlflow.runName": f"release {cfg.name}"})  # the two releases of a pipeline differ

    run_id = ctx.tracker.run_id  # None outside a tracked run
    model_id = registry.log_release_model(local, run_id=run_id, name=cfg.name) if run_id else None
    version = None
    if cfg.register_model:
        version = registry.register_release(
            cfg.name, release_uri=norm_uri(release_uri), release_sha256=digest, run_id=run_id,
            metrics=evaluation["metrics"], description=f"{model_uri} released at {release_uri}",
            extra_tags={"moeflow.source_model_uri": model_uri}, model_id=model_id)
        if gate["promoted"]:
            now = registry.current_champion(cfg.name)
            if (now or {}).get("version") != (champion or {}).get("version"):  # someone promoted meanwhile
                recheck = evaluate_gate(cfg.gate, evaluation["metrics"], now)
                gate["rechecked_against"] = (now or {}).get("version")
                if not recheck["passed"]:
                    gate["promoted"] = False
                    gate["reasons"] = recheck["reasons"]
            if gate["promoted"]:
                registry.promote(cfg.name, version)
        registry.set_gate_tag(cfg.name, version, gate)
        log.info("registered %s version %s (candidate)%s", cfg.name, version,
                 ", promoted to champion" if gate["promoted"] else "")
    # The final decision (the manifest's copy predates registration), beside RESULT.json.
    storage.write_json(storage.join_uri(ctx.output_uri, GATE_NAME), {"version": version, **gate})
    shutil.rmtree(local, ignore_errors=True)

    metrics: dict[str, float] = {
        "gate_passed": float(gate["passed"]),
        "promoted": float(gate["promoted"]),
        "total_params": float(info["total_params"]),
        "active_params": float(info["active_params"]),
        "release_bytes": float(built["bytes"]),
        "release_files": float(len(built["files"])),
        "export_max_abs_diff": built["export_max_abs_diff"],
        "verify_max_abs_diff": float(check["max_abs_diff"]),
    }
    if version is not None:
        metrics["model_version"] = float(version)
    if champion is not None:
        metrics["champion_version"] = float(champion["version"])
    metrics.update({f"eval/{metric_key(k)}": float(v) for k, v in evaluation["metrics"].items()})
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict(gate, "gate.json")
    ctx.tracker.log_dict(ledger, "efficiency_ledger.json")
    ctx.tracker.log_dict(chain, "lineage.json")
    return StageOutput(outputs={"release": release_uri}, metrics=metrics,
                       extra={"gate": gate, "release_sha256": digest, "name": cfg.name,
                              "version": None if version is None else int(version),
                              "champion_version": None if champion is None else int(champion["version"]),
                              "evaluation": evaluation["metrics"]})
