"""Fixtures for the data-prep tests: small configs, sample prose and JSONL writers (as callables)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from components.data import PrepConfig


def _small_config(**overrides) -> PrepConfig:
    """A prep config that runs in well under a second: few problems, small vocab, short rows."""
    base = {
        "generators": {
            "tasks": {"n_per_family": 40, "wrong_fraction": 0.25},
            "generic_text": {"n_docs": 40},
        },
        "eval": {"n_per_family": 10, "seed": 99},
        "tokenizer": {"vocab_size": 400},
        "packing": {"seq_len": 32, "shard_tokens": 33 * 50},
        "val_fraction": 0.1,
        "seed": 3,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return PrepConfig.model_validate(base)


def _sources_only(*sources: dict, **overrides) -> PrepConfig:
    """A config reading only `sources` (no generators, no eval split)."""
    return _small_config(
        sources=list(sources),
        generators={"tasks": {"n_per_family": 0}, "generic_text": {"n_docs": 0}},
        eval={"n_per_family": 0},
        **overrides,
    )


PROSE = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Seven sailors counted 42 boats in the harbor before the storm arrived.",
    "A careful baker measured flour, sugar and 3 eggs for the morning bread.",
    "Children in the village school learned to add 17 and 25 on the blackboard.",
    "An old map showed a hidden path through the forest to the golden valley.",
    "The engineer repaired the clock tower so the whole city could tell time again.",
]


def _write_jsonl(path: Path, rows: list, *, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if gz else lines)
    return path


@pytest.fixture(scope="session")
def small_config():
    """small_config(**overrides) -> PrepConfig: generators on, tiny sizes."""
    return _small_config


@pytest.fixture(scope="session")
def sources_only():
    """sources_only(*source_dicts, **overrides) -> PrepConfig reading only those sources."""
    return _sources_only


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, rows, gz=False) -> path; rows are dicts or raw line strings."""
    return _write_jsonl


@pytest.fixture(scope="session")
def prose() -> list[str]:
    return list(PROSE)
