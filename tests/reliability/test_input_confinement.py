"""Prep inputs stay inside the allowed roots (issue 17, item 5): real files and symlinks, the real planner
and reader. A directory source -- documented in SourceConfig.uri and components/data/sources.py -- plans and
reads without being a published output."""

from __future__ import annotations

import json
import os

import pytest

from components.data import PrepError, SourceConfig
from components.data.sources import expand_source, read_file
from flows import registry
from infra.contract import ConfigError

ROWS = [{"text": f"document number {i} about boats and rivers"} for i in range(20)]


def _corpus(root):
    root.mkdir(parents=True)
    (root / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:10]))
    (root / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[10:]))
    return root


def _prep_cfg(uri: str) -> dict:
    return {"sources": [{"uri": uri}], "generators": {"tasks": {"n_per_family": 0}, "generic_text": {"n_docs": 0}},
            "eval": {"n_per_family": 0}, "tokenizer": {"vocab_size": 300}, "packing": {"seq_len": 16}}


def test_a_directory_source_plans_and_reads_as_documented(tmp_path, moeflow_home, patch_env):
    corpus = _corpus(tmp_path / "data" / "corpus")
    with patch_env(MOEFLOW_DATA_ROOTS=json.dumps([str(tmp_path / "data")])):
        plan = registry.get("prep").plan(_prep_cfg(str(corpus)))
        files = expand_source(SourceConfig(uri=str(corpus)))
    assert next(iter(plan.input_hashes.values())).startswith("tree:")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-0.jsonl", "part-1.jsonl"]
    assert sum(len(read_file(f, SourceConfig(uri=f), max_bad_fraction=0)[0]) for f in files) == len(ROWS)


def test_symlinks_and_dotdot_out_of_an_allowed_root_are_refused(tmp_path, moeflow_home, patch_env):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a private key the prep must never read\n")
    corpus = _corpus(tmp_path / "data" / "corpus")
    (tmp_path / "data" / "link.txt").symlink_to(secret)
    with patch_env(MOEFLOW_DATA_ROOTS=json.dumps([str(tmp_path / "data")])):
        with pytest.raises(ConfigError, match=r"sources\.0\.uri.*outside the allowed data roots"):
            registry.get("prep").plan(_prep_cfg(str(tmp_path / "data" / "link.txt")))
        with pytest.raises(ConfigError, match=r"'\.\.' is not allowed"):
            registry.get("prep").plan(_prep_cfg(str(corpus / ".." / ".." / "outside" / "secret.txt")))
        with pytest.raises(ConfigError, match="outside the allowed data roots"):
            registry.get("prep").plan(_prep_cfg(str(secret)))
        os.symlink(secret, corpus / "part-2.jsonl")  # a link inside an allowed directory source
        with pytest.raises(PrepError, match="part-2.jsonl is a symlink"):
            expand_source(SourceConfig(uri=str(corpus)))
        with pytest.raises(ConfigError, match="part-2.jsonl is a symlink"):
            registry.get("prep").plan(_prep_cfg(str(corpus)))
    with pytest.raises(ConfigError, match="is a symlink"):  # no roots configured: a linked source is refused
        registry.get("prep").plan(_prep_cfg(str(tmp_path / "data" / "link.txt")))
