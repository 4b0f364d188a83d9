"""Fixtures of the fault-and-abuse suite, reused from the release and training tests (imported, not copied):
a tiny tokenizer and models for releases, a published micro dataset and a shared home for pretraining jobs."""

from __future__ import annotations

from tests.release.conftest import make_model, tokenizer_dir  # noqa: F401
from tests.training.conftest import micro_dataset, training_home  # noqa: F401
