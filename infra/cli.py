"""The `moeflow` command line.

Every stage command takes `--config FILE` (a preset such as `configs/tiny.yaml`, whose section named
after the stage is used, or a file holding just that stage's config) and `--set key=value` overrides
(dotted keys, YAML values), prints progress on stderr, and with `--json` ends with one JSON object on
stdout. Bad input exits non-zero with a message naming the field or file:line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"
STAGE_COMMANDS = ("prep", "pretrain", "rl", "distill", "eval")


class CliError(Exception):
    """A user error: printed as `error: ...` without a traceback; exit code 2 (usage) or 3 (input)."""

    def __init__(self, message: str, code: int = 3):
        super().__init__(message)
        self.code = code


def _quiet_defaults() -> None:
    """Clean output for users: Prefect logs go to its API/UI, not the console; no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The ephemeral API migrates a new database on first start: slow on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from infra.settings import get_settings

    prefect_home = get_settings().home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))


# ---- config files --------------------------------------------------------------------------------
def resolve_preset(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise CliError(f"--preset {name}: no such preset (known: {known})", code=2)
    return path


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CliError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (the value is parsed as YAML: numbers, booleans, lists)."""
    for item in sets:
        if "=" not in item:
            raise CliError(f"--set {item!r}: expected key=value", code=2)
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise CliError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = parse_value(raw)
    return data


def stage_config(path: str, stage: str, sets: list[str]) -> dict[str, Any]:
    """The config of one stage from a preset (its `stage:` section) or a stage-only file, plus overrides."""
    data = load_yaml(path)
    section = data[stage] if stage in data else data
    if not isinstance(section, dict):
        raise CliError(f"{path}: section {stage!r} must be a mapping")
    return apply_overrides(dict(section), sets)


# ---- output --------------------------------------------------------------------------------------
def emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    print(human, file=sys.stderr)
    if as_json:
        print(json.dumps(result, indent=None, default=str))


# ---- commands ------------------------------------------------------------------------------------
def cmd_stage(stage: str, args: argparse.Namespace) -> int:
    from infra.stages import cached_result, plan_stage

    cfg = stage_config(args.config, stage, args.set)
    t0 = time.time()
    plan = plan_stage(stage, cfg, source=args.config)
    cached = cached_result(plan)
    flows = importlib.import_module(f"flows.{stage}")
    if cached is not None:
        # Fully cached: no need to start an orchestrator to learn what we already know.
        print(f"[{stage}] cached: {plan.output_uri}", file=sys.stderr)
        summary = flows.summarize(cached)
    else:
        summary = flows.run(cfg)
    summary["seconds"] = round(time.time() - t0, 2)
    emit(summary, args.json, flows.describe(summary))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from infra.doctor import run_checks
    from infra.settings import get_settings

    settings = get_settings()
    print(yaml.safe_dump({"settings": settings.masked()}, sort_keys=False), file=sys.stderr)
    checks = run_checks(settings)
    ok = all(c["ok"] for c in checks)
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"settings": settings.masked(), "checks": checks, "ok": ok}))
    return 0 if ok else 1


def cmd_model(args: argparse.Namespace) -> int:
    from components.model.cli import info_main

    return info_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description="DeepSeek-style LLM training platform")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
        p.add_argument("--config", required=config_required, help="preset or config YAML file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (dotted key, YAML value); repeatable")
        p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")

    for stage in STAGE_COMMANDS:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        common(p)
        p.set_defaults(func=lambda a, s=stage: cmd_stage(s, a))

    p = sub.add_parser("doctor", help="print the resolved settings (secrets masked) and check services")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    args = build_parser().parse_args(argv)
    from infra.jobs import JobFailed
    from infra.stages import ConfigError

    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code or 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
