"""The layer rules of docs/architecture.md, checked on the source: imports point down only, no stage package
imports another, the platform (`infra/`) imports no component or flow, and the one stage registry agrees
with prefect.yaml, the CLI and the docs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from flows import registry

REPO = Path(__file__).resolve().parents[1]
STAGE_PACKAGES = {s.package.split(".")[1] for s in registry.PIPELINE}
# The shared components: below the stages, each imported by two or more of them (docs/architecture.md).
SHARED_PACKAGES = {"common", "dataset", "model", "refs", "scoring", "sft", "tasks"}


def imports_of(path: Path) -> set[str]:
    """Every absolute module a file imports (at any depth: lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def package_imports(top: str) -> dict[Path, set[str]]:
    return {p: imports_of(p) for p in sorted((REPO / top).rglob("*.py"))}


def components_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "components" and len(parts) > 1 else None


def test_every_components_package_is_a_stage_or_shared():
    packages = {p.name for p in (REPO / "components").iterdir() if (p / "__init__.py").exists()}
    assert packages == STAGE_PACKAGES | SHARED_PACKAGES, (
        "a new package under components/ must be a registered stage or listed as shared (docs/architecture.md)")
    assert not STAGE_PACKAGES & SHARED_PACKAGES


@pytest.mark.parametrize("top", ["infra", "kernels"])
def test_lower_layers_import_nothing_above_them(top):
    above = ("components", "flows") if top == "infra" else ("components", "flows", "infra")
    bad = {f"{p.relative_to(REPO)}: {m}" for p, mods in package_imports(top).items() for m in mods
           if m.split(".")[0] in above}
    assert not bad, f"{top}/ imports from a layer above it:\n" + "\n".join(sorted(bad))


def test_components_import_no_flows_and_no_other_stage():
    bad = []
    for path, mods in package_imports("components").items():
        own = path.relative_to(REPO / "components").parts[0]
        for m in mods:
            if m.split(".")[0] == "flows" or m == "prefect" or m.startswith("prefect."):
                bad.append(f"{path.relative_to(REPO)}: {m} (components never import flows or Prefect)")
            dep = components_package(m)
            if dep is None or dep == own:
                continue
            if dep in STAGE_PACKAGES:
                bad.append(f"{path.relative_to(REPO)}: {m} (stage package {dep!r} imported from {own!r})")
    assert not bad, "\n".join(bad)


def test_model_layer_imports_only_kernels():
    bad = {f"{p.relative_to(REPO)}: {m}" for p, mods in package_imports("components/model").items() for m in mods
           if m.split(".")[0] in ("flows", "infra") or components_package(m) not in (None, "model")}
    assert not bad, "\n".join(sorted(bad))


def test_prefect_yaml_declares_exactly_the_registry_flows():
    entries = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    declared = {e["name"]: (e["entrypoint"], e["description"], tuple(e["tags"])) for e in entries}
    expected = {s.name: (s.flow, s.help, s.tags) for s in (*registry.PIPELINE, *registry.EXTRA_FLOWS)}
    assert declared == expected, "prefect.yaml and flows/registry.py disagree"
    for e in entries:
        registry.load_flow(e["entrypoint"])  # every entrypoint imports


def test_every_stage_has_its_package_flow_and_cli_command():
    from flows.cli import build_parser

    parser = build_parser()
    for stage in registry.PIPELINE:
        impl = stage.impl
        for name in ("Config", "input_uris", "run"):
            assert hasattr(impl, name), f"{stage.package}.stage lacks {name}"
        flow_module = stage.flow_module
        for name in ("run", "summarize", "describe"):
            assert callable(getattr(flow_module, name, None)), f"{stage.flow}: module lacks {name}()"
        args = parser.parse_args([*stage.command, "--config", "configs/tiny.yaml"])
        assert args.func is not None


def test_the_cli_docs_list_every_stage_command():
    doc = (REPO / "docs" / "cli.md").read_text()
    missing = [" ".join(s.command) for s in registry.PIPELINE if f"`moeflow {' '.join(s.command)}`" not in doc]
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_unknown_stage_names_the_known_ones():
    from infra.contract import ConfigError

    with pytest.raises(ConfigError, match="known stages: prep, pretrain"):
        registry.get("pretrian")


def test_architecture_doc_names_every_package_and_no_file_outside_the_repo():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for pkg in sorted(STAGE_PACKAGES | SHARED_PACKAGES):
        assert f"components/{pkg}/" in doc, f"docs/architecture.md does not describe components/{pkg}/"
    for stage in registry.PIPELINE:
        assert f"`{stage.name}`" in doc
    outside = [str(p.relative_to(REPO)) for top in ("components", "flows", "infra", "kernels", "helm", "docs")
               for p in (REPO / top).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".txt")
               and ("../shared" in p.read_text(errors="ignore") or "ARCHITECTURE.md" in p.read_text(errors="ignore"))]
    assert not outside, f"files pointing outside the repository: {outside}"
