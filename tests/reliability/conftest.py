"""Fixtures of the fault-and-abuse suite: the release tests' tiny tokenizer and models (reused, not copied)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "release_fixtures", Path(__file__).parents[1] / "release" / "conftest.py")
_release = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_release)

tokenizer_dir = _release.tokenizer_dir
make_model = _release.make_model
