"""infra/docker/Dockerfile, checked statically (no Docker engine here): CUDA PyTorch base whose torch is
the version constraints.txt pins, pinned installs, a numeric non-root user matching the pods, the
moeflow-job entry point, and sources that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from infra.launch.k8s_render import RUN_AS_UID

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_cuda_pytorch_of_the_pinned_torch_version():
    (base,) = [rest for word, rest in instructions() if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    m = re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert m, base
    pinned = re.search(r"^torch==(.+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert m.group(1) == pinned, "bump BASE_IMAGE and the torch pin of constraints.txt together"
    assert ("FROM", "${BASE_IMAGE}") in instructions()


def test_every_pip_install_is_constrained_and_keeps_the_base_images_torch():
    runs = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
    assert runs
    for run in runs:
        for cmd in re.findall(r"pip install[^;&]*", run):
            assert "-c constraints.image.txt" in cmd, cmd
    assert "grep -vE '^(torch|triton)==' constraints.txt > constraints.image.txt" in runs[0]
    assert 'echo "torch==$have" >> constraints.image.txt' in runs[0]


def test_runs_as_the_numeric_non_root_user_the_pods_expect():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users and users[-1] == f"{RUN_AS_UID}:{RUN_AS_UID}" and RUN_AS_UID != 0


def test_entry_point_is_moeflow_job():
    assert ("ENTRYPOINT", '["moeflow-job"]') in instructions()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["moeflow-job"] == "flows.job:main"


def test_copied_sources_exist_and_are_not_ignored():
    ignored = {ln.strip() for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", ".moeflow"} <= ignored
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                if "*" not in src:
                    assert (ROOT / src).exists(), f"COPY {src}: no such path"
                    assert src not in ignored, f"COPY {src} but the .dockerignore drops it"
