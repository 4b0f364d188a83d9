"""The `moeflow` command line.

Every stage command takes `--config FILE` (a preset such as `configs/tiny.yaml`, whose section named
after the stage is used, or a file holding just that stage's config) and `--set key=value` overrides
(dotted keys, YAML values), prints progress on stderr, and with `--json` ends with one JSON object on
stdout. Bad input exits non-zero with a message naming the field or file:line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows import registry
from infra.configfile import apply_overrides, load_yaml
from infra.redact import redact


class CliError(Exception):
    """A user error: printed as `error: ...` without a traceback; exit code 2 (usage) or 3 (input)."""

    def __init__(self, message: str, code: int = 3):
        super().__init__(message)
        self.code = code


def _quiet_defaults(debug: bool = False) -> None:
    """Clean output for users: Prefect logs go to its API/UI, not the console (its failure tracebacks too:
    the CLI prints one `error:` line, and the traceback only with --debug); no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DEBUG" if debug else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The ephemeral API migrates a new database on first start: slow on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating database tables" chatter
    from infra.settings import get_settings

    settings = get_settings()
    if settings.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    prefect_home = settings.home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


# ---- config files --------------------------------------------------------------------------------
def stage_config(path: str, stage: str, sets: list[str]) -> dict[str, Any]:
    """The config of one stage from a preset (its `stage:` section) or a stage-only file, plus overrides."""
    data = load_yaml(path)
    section = data[stage] if stage in data else data
    if not isinstance(section, dict):
        raise CliError(f"{path}: section {stage!r} must be a mapping")
    return apply_overrides(dict(section), sets)


def _preflight() -> None:
    """Fail fast, naming the endpoint, when the tracking server or Prefect API does not answer in time."""
    from infra.doctor import preflight
    from infra.settings import get_settings

    try:
        preflight(get_settings())
    except Exception as exc:
        raise CliError(f"{type(exc).__name__}: {exc}", code=4) from None


# ---- output --------------------------------------------------------------------------------------
def emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    """The human text on stderr, the JSON on stdout; URI passwords masked in both."""
    print(redact(human), file=sys.stderr)
    if as_json:
        print(redact(json.dumps(result, indent=None, default=str)))


# ---- commands ------------------------------------------------------------------------------------
def cmd_stage(stage: str, args: argparse.Namespace) -> int:
    from flows.references import resolve_references
    from infra.plan import cached_result

    cfg = stage_config(args.config, stage, args.set)
    t0 = time.time()
    registry.get(stage).validate(cfg, source=args.config, overrides=args.set)  # bad values before the store
    # `latest:<stage>` references become URIs next: the plan, the cache and the run all see the URI
    cfg = resolve_references(stage, cfg, log=lambda line: print(redact(f"[{stage}] {line}"), file=sys.stderr))
    plan = registry.get(stage).plan(cfg, source=args.config, overrides=args.set)
    cached = cached_result(plan)
    flows = registry.get(stage).flow_module
    if cached is not None:
        # Fully cached: no need to start an orchestrator to learn what we already know.
        print(redact(f"[{stage}] cached: {plan.output_uri}"), file=sys.stderr)
        summary = flows.summarize(cached)
    else:
        _preflight()
        summary = flows.run(cfg)
    summary["seconds"] = round(time.time() - t0, 2)
    emit(summary, args.json, flows.describe(summary))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import describe, load_preset, pipeline_flow

    if bool(args.preset) == bool(args.config):
        raise CliError("give one of --preset NAME or --config FILE", code=2)
    preset = args.config or args.preset
    load_preset(preset, args.set)  # fail on bad input before starting anything
    _preflight()
    t0 = time.time()
    summary = pipeline_flow(preset=preset, overrides=args.set)
    summary["seconds"] = round(time.time() - t0, 2)
    emit(summary, args.json, describe(summary))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from infra.doctor import run_checks
    from infra.settings import get_settings

    settings = get_settings()
    print(yaml.safe_dump({"settings": settings.masked()}, sort_keys=False), file=sys.stderr)  # URIs masked
    checks = run_checks(settings)
    ok = all(c["ok"] for c in checks)
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"settings": settings.masked(), "checks": checks, "ok": ok}))
    return 0 if ok else 1


def model_config_section(data: dict[str, Any]) -> dict[str, Any]:
    """A model config from a preset (`pretrain.model`), a file with a `model:` key, or a bare model file."""
    if isinstance(data.get("pretrain"), dict) and "model" in data["pretrain"]:
        return data["pretrain"]["model"]
    return data.get("model", data)


def cmd_model_info(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from components.common.config import resolve_model
    from components.model import ModelConfig, format_info, model_info

    data = apply_overrides(dict(model_config_section(load_yaml(args.config))), args.set)
    try:
        cfg = ModelConfig.model_validate(resolve_model(data))
    except ValueError as exc:
        if not isinstance(exc, ValidationError):
            raise CliError(f"{args.config}: {exc}") from None
        raise CliError(f"{args.config}: invalid model config:\n  " + "\n  ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    info = model_info(cfg, seq_len=args.seq_len)
    emit(info, args.json, format_info(info))
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    from components.model import export_hf
    from components.refs.checkpoint import load_model
    from infra import storage

    model_dir = storage.fetch_dir(args.checkpoint)  # verified once; weights and tokenizer come from it
    model, _ = load_model(model_dir)
    out = export_hf(model, args.out, tokenizer_dir=model_dir)
    emit({"out": str(out)}, args.json, f"exported {args.checkpoint} -> {out} (loads with transformers)")
    return 0


def render_cli(stage: str, config_file: str, gpus: int | None = None, nodes: int | None = None,
               settings: Any = None) -> str:
    """`moeflow k8s render`: `render_stage` with the resources of a preset file.

    Resources come from the stage's `resources:` section of the preset (a stage config file may have it at
    its top level); `--gpus` picks the GPU preset of that size instead (`preset_resources`) and `--nodes`
    sets the node count.
    """
    from infra.contract import Resources
    from infra.launch.k8s_render import preset_resources, render_stage
    from infra.settings import get_settings

    settings = settings or get_settings()
    try:
        text = Path(config_file).read_text()
        preset = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_file}: cannot read the preset: {exc}") from exc
    if not isinstance(preset, dict):
        raise ValueError(f"{config_file}: a preset is a YAML mapping, got {type(preset).__name__}")
    section = preset[stage] if isinstance(preset.get(stage), dict) else preset
    base = None
    if isinstance(section.get("resources"), dict):
        where = f"{stage}.resources" if section is not preset else "resources"
        try:
            base = Resources.model_validate(section["resources"])
        except ValueError as exc:
            raise ValueError(f"{config_file}: {where}: {exc}") from exc
    if gpus is not None:
        resources = preset_resources(gpus, nodes if nodes is not None else (base.nodes if base else 1))
    elif base is not None:
        resources = base if nodes is None else base.model_copy(update={"nodes": nodes})
    else:
        resources = preset_resources(0, nodes or 1)
    return render_stage(stage, resources, settings, fingerprint=text,
                        title=f"moeflow k8s render --stage {stage} --config {config_file}")


def cmd_k8s_render(args: argparse.Namespace) -> int:
    try:
        print(render_cli(args.stage, args.config, args.gpus, args.nodes))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_release_verify(args: argparse.Namespace) -> int:
    from components.release.verify import verify_release

    report = verify_release(args.uri, expect_digest=args.expect_digest, signature=args.signature,
                            public_key=args.public_key)
    lines = [f"  [{'ok' if c.get('ok') else 'FAIL'}] {c.get('name')}: {c.get('detail', '')}"
             for c in report.get("checks", [])]
    verdict = "release verified" if report["ok"] else "release verification FAILED"
    emit(report, args.json, "\n".join([*lines, f"{verdict}: {args.uri}"]))
    return 0 if report["ok"] else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy_all
    from infra.settings import get_settings

    if not os.environ.get("PREFECT_API_URL"):
        raise CliError("moeflow deploy registers deployments on a Prefect server: set MOEFLOW_PREFECT_API_URL "
                       "(e.g. http://prefect.example:4200/api)", code=2)
    image = args.image or get_settings().kubernetes.image
    ids = deploy_all(image)
    emit({"deployments": ids, "image": image}, args.json,
         f"registered {len(ids)} deployments on {os.environ['PREFECT_API_URL']} (image {image})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve_all

    if not os.environ.get("PREFECT_API_URL"):
        raise CliError("moeflow serve needs a Prefect server to register with: set MOEFLOW_PREFECT_API_URL, "
                       "or run `moeflow up`, which starts a local one with the UIs", code=2)
    print(redact(f"serving every deployment of prefect.yaml against {os.environ['PREFECT_API_URL']} (Ctrl-C stops)"),
          file=sys.stderr)
    serve_all()
    return 0


def _stop_on_sigterm() -> None:
    """kill / systemd / a CI timeout stop the servers `up` started as Ctrl-C does (else they are orphaned)."""
    import signal

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def cmd_up(args: argparse.Namespace) -> int:
    from infra.local_services import LocalServices

    _stop_on_sigterm()
    if args.cluster_like:
        from infra.settings import get_settings
        from infra.stack import ClusterStack

        stack = ClusterStack(get_settings(), prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                             s3_port=args.s3_port, pg_port=args.pg_port)
        with stack:
            if not args.no_serve:
                print("deploying prefect.yaml to the work pool (prefect deploy)...", file=sys.stderr, flush=True)
                stack.deploy()
            print(stack.banner(), file=sys.stderr, flush=True)
            stack.wait()
        return 0
    with LocalServices(prefect_port=args.prefect_port, mlflow_port=args.mlflow_port) as services:
        print(redact(services.banner()), file=sys.stderr, flush=True)
        if args.no_serve:
            services.wait()
        else:
            from flows.deploy import serve_all

            serve_all()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description="DeepSeek-style LLM training platform")
    parser.add_argument("--version", action="version", version=f"moeflow {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Prefect's own log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
        p.add_argument("--config", required=config_required, help="preset or config YAML file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (dotted key, YAML value); repeatable")
        p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")

    groups: dict[str, argparse._SubParsersAction] = {}
    for stage in registry.PIPELINE:  # `moeflow prep`, ..., `moeflow release run`
        *group, word = stage.command
        parent = sub
        if group:
            if group[0] not in groups:
                groups[group[0]] = sub.add_parser(group[0], help=f"{group[0]} commands").add_subparsers(
                    dest=f"{group[0]}_command", required=True)
            parent = groups[group[0]]
        p = parent.add_parser(word, help=stage.help)
        common(p)
        p.set_defaults(func=lambda a, s=stage.name: cmd_stage(s, a))

    p = sub.add_parser("pipeline", help="the whole lifecycle: prep, pretrain, RL, distill, eval, release")
    p.add_argument("--preset", help="preset name in configs/ (e.g. tiny)")
    common(p, config_required=False)
    p.set_defaults(func=cmd_pipeline)

    model = sub.add_parser("model", help="model arithmetic and Hugging Face export").add_subparsers(
        dest="model_command", required=True)
    p = model.add_parser("info", help="parameters (total/active), FLOPs per token, KV-cache bytes per token")
    common(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs")
    p.set_defaults(func=cmd_model_info)
    p = model.add_parser("export", help="write a checkpoint as a Hugging Face directory (DeepseekV3, Llama or Qwen2)")
    p.add_argument("--checkpoint", required=True, help="URI of a trained model (a stage output)")
    p.add_argument("--out", required=True, help="new local directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_export)

    k8s = sub.add_parser("k8s", help="Kubernetes jobs").add_subparsers(dest="k8s_command", required=True)
    p = k8s.add_parser("render", help="print the manifests a stage would run as")
    p.add_argument("--stage", required=True, choices=list(registry.STAGES))
    p.add_argument("--config", required=True, help="preset or config YAML file")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=None, help="nodes (> 1: Indexed Job + headless Service)")
    p.set_defaults(func=cmd_k8s_render)

    p = groups["release"].add_parser("verify", help="check every SHA-256 and the logits against transformers")
    p.add_argument("uri", help="release directory URI (local or s3://), or models:/NAME@ALIAS (then the manifest "
                               "digest is checked against the registry's moeflow.release_sha256)")
    p.add_argument("--expect-digest", metavar="SHA256", help="the manifest digest the release must have (from a "
                                                              "source the release cannot rewrite)")
    p.add_argument("--public-key", metavar="PEM", help="check the release's model-signing signature with this key")
    p.add_argument("--signature", metavar="FILE", help="signature bundle (default: model.sig in the release)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_release_verify)

    p = sub.add_parser("deploy", help="register prefect.yaml's deployments on a Kubernetes work pool")
    p.add_argument("--image", default=None, help="job image (default: settings kubernetes.image)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_deploy)
    p = sub.add_parser("serve", help="serve every deployment from this process (local runs, schedules)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("up", help="start the Prefect UI and MLflow UI on the embedded stores and serve the flows")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--no-serve", action="store_true",
                   help="only the UIs, no deployments (with --cluster-like: no `prefect deploy`)")
    p.add_argument("--cluster-like", action="store_true",
                   help="the Helm chart's topology on loopback: PostgreSQL, Prefect server + process worker, "
                        "MLflow server with S3 artifacts, moto's S3 (docs/cluster.md)")
    p.add_argument("--s3-port", type=int, default=9000, help="with --cluster-like: moto's S3 server")
    p.add_argument("--pg-port", type=int, default=5432, help="with --cluster-like: PostgreSQL")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("doctor", help="print the resolved settings (secrets masked) and check services")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    _describe(parser)
    return parser


EXAMPLES = {
    "prep": "moeflow prep --config configs/tiny.yaml --json",
    "pretrain": "moeflow pretrain --config configs/tiny.yaml --set dataset=<dataset_uri> --set steps=200",
    "rl": "moeflow rl --config configs/tiny.yaml --set model=<checkpoint_uri> --set grpo.steps=100",
    "distill": "moeflow distill --config configs/tiny.yaml --set teacher=<rl checkpoint_uri>",
    "eval": "moeflow eval --config configs/tiny.yaml --set 'models=[{uri: models:/moeflow-teacher@champion}]'",
    "release run": "moeflow release run --config configs/tiny.yaml --set model=<model uri> --set name=my-model",
    "release verify": "moeflow release verify models:/moeflow-teacher@champion",
    "pipeline": "moeflow pipeline --preset tiny --json",
    "model info": "moeflow model info --config configs/models/deepseek-v3.yaml   (or a Hugging Face config.json)",
    "model export": "moeflow model export --checkpoint <checkpoint_uri> --out ./hf-model",
    "k8s render": "moeflow k8s render --stage pretrain --config configs/pretrain/multinode.yaml --gpus 8 --nodes 2",
    "deploy": "MOEFLOW_PREFECT_API_URL=http://prefect:4200/api moeflow deploy --image <registry>/moeflow-job:<tag>",
    "serve": "MOEFLOW_PREFECT_API_URL=http://127.0.0.1:4200/api moeflow serve",
    "up": "moeflow up          (or: moeflow up --cluster-like)",
    "doctor": "moeflow doctor --json",
}


def _describe(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Every subcommand's --help opens with its one-line help and ends with an example (EXAMPLES)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            key = " ".join((*path, name))
            sub.description = sub.description or helps.get(name)
            if key in EXAMPLES:
                sub.epilog = f"example:\n  {EXAMPLES[key]}"
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
            _describe(sub, (*path, name))


def job_failure(exc: Any) -> str:
    """A failed job in one line: the job's own `ERROR stage X failed: why` line when it wrote one (bad
    input, divergence), else the launcher's headline with the last log lines."""
    for line in reversed(exc.log_tail):
        head, sep, why = line.partition(" failed: ")
        if sep and " ERROR stage " in head and why.strip():
            return f"stage {head.rsplit(' ', 1)[-1]} failed (exit code {exc.exit_code}): {why.strip()}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and --version end here, having written nothing
    from pydantic import ValidationError

    from infra.contract import ConfigError, JobFailed
    from infra.redact import install_log_redaction
    from infra.settings import settings_error

    install_log_redaction()
    from infra.launch.local import install_signal_handlers, stop_running_jobs

    install_signal_handlers()  # SIGTERM / SIGHUP stop the running job first, then end here cleanly

    try:
        _quiet_defaults(args.debug)
        return int(args.func(args) or 0)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        print(f"error: {settings_error(exc)}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 3
    except JobFailed as exc:
        print(f"error: {redact(job_failure(exc))}", file=sys.stderr)
        return exc.exit_code or 1
    except KeyboardInterrupt as exc:
        stop_running_jobs()  # SIGINT: the handler above did not run
        reason = str(exc) or "SIGINT"
        print(f"interrupted ({reason}); the job was stopped: rerun the same command to resume from its last "
              "checkpoint", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "interrupted": reason}))
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected failure: one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {redact(str(exc))}\n(run `moeflow --debug ...` for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
