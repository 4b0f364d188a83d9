"""Progress bars for prep's long loops: tqdm on a terminal; in a job (stderr is a pipe, read line by line by
the launcher and shown in the Prefect run's logs), one log line every `JOB_INTERVAL_S` with the rate and
the time left, and nothing at all for work that ends sooner (no stale `0%` line)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

JOB_INTERVAL_S = 15.0
log = logging.getLogger("moeflow.prep")


class _LogLines:
    """A file for tqdm that turns each refresh into one log line."""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled unless `progress`, and line-based with a delay outside a terminal."""
    if sys.stderr.isatty():
        return tqdm(iterable, disable=not progress, leave=False, **kwargs)
    return tqdm(iterable, disable=not progress, leave=False, file=_LogLines(), mininterval=JOB_INTERVAL_S,
                delay=JOB_INTERVAL_S, ascii=True, **kwargs)
