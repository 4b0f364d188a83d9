"""The data-preparation error."""

from __future__ import annotations


class PrepError(ValueError):
    """Bad input to the prep stage: a missing or empty file, too many malformed records, nothing left.

    The message names the file (and `file:line` examples of malformed records, also in `examples`).
    """

    def __init__(self, message: str, *, examples: list[str] | None = None):
        self.examples = list(examples or [])
        super().__init__(message)
