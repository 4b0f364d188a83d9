"""What a new user meets first, through the real `moeflow` command: help and --version write nothing, a bad
environment value or stage input gives one line naming it (no traceback), an override is blamed for its own
mistake, and every repository path the docs and prefect.yaml name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows import registry

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "prefect.yaml", *sorted((REPO / "docs").glob("*.md")),
        REPO / "helm" / "moeflow" / "README.md", REPO / "kernels" / "README.md"]
TOPS = "components|flows|infra|kernels|bench|helm|tests|configs|docs"
REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{TOPS})/[\w./-]*\w)(?![\w<./-])")  # not templates like test_<op>.py


def moeflow(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "MOEFLOW_HOME": str(cwd / "home"), **env}
    for name in ("PREFECT_HOME", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):  # as a user's shell has them
        environ.pop(name, None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["rl", "--help"], ["release", "run", "--help"]])
def test_help_and_version_write_nothing(tmp_path, args):
    proc = moeflow(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert list(tmp_path.iterdir()) == [], "help must not create files"


def test_every_command_has_a_description_and_an_example():
    from flows.cli import EXAMPLES, build_parser

    parser = build_parser()
    for words in [s.command for s in registry.PIPELINE] + [("pipeline",), ("model", "info"), ("doctor",)]:
        with pytest.raises(SystemExit):
            parser.parse_args([*words, "--help"])
    commands = {" ".join(s.command) for s in registry.PIPELINE}
    assert commands <= set(EXAMPLES), commands - set(EXAMPLES)


def test_stage_help_shows_what_the_stage_does_and_how_to_run_it(tmp_path):
    stage = registry.get("rl")
    out = moeflow(*stage.command, "--help", cwd=tmp_path).stdout
    assert stage.help in " ".join(out.split()) and "example:\n  moeflow rl --config configs/tiny.yaml" in out


def test_version_names_the_package(tmp_path):
    assert re.fullmatch(r"moeflow \S+", moeflow("--version", cwd=tmp_path).stdout.strip())


def test_a_bad_environment_value_is_one_line_naming_the_variable(tmp_path):
    proc = moeflow("doctor", cwd=tmp_path, MOEFLOW_LAUNCHER="k8s")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: invalid settings: MOEFLOW_LAUNCHER: Input should be 'local' or 'kubernetes' (got 'k8s')"]


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path):
    proc = moeflow("rl", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "grpo.steps=many", cwd=tmp_path)
    assert proc.returncode == 3
    assert "--set grpo.steps=many: rl.grpo.steps: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_stage_input_found_by_the_job_ends_in_one_error_line_without_traceback(tmp_path):
    """The job itself rejects the data (exit code 3), through Prefect and the local launcher: the last line
    says why, once, and neither Prefect nor the CLI prints a traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "unterminated\n')
    proc = moeflow("prep", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"sources=[{{uri: {bad}}}]",
                   "--set", "generators.tasks.n_per_family=5", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage prep failed (exit code 3): ") and "malformed" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "rec/s" not in proc.stderr, "a progress bar of a few seconds' work left a stale line in the job's log"


def test_every_repository_path_the_docs_name_exists():
    missing = [f"{doc.relative_to(REPO)}: {m.group(1)}" for doc in DOCS for m in REPO_PATH.finditer(doc.read_text())
               if not (REPO / m.group(1)).exists()]
    assert not missing, "\n".join(missing)
