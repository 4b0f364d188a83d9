"""`moeflow-job <stage> --config URI`: the job process's entry point (console script), wiring the stage
registry to the platform's job runner (`infra.entry`), which imports no stage itself."""

from __future__ import annotations

import sys

from flows.registry import stage_impl
from infra.entry import main as run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, stage_impl)


if __name__ == "__main__":
    sys.exit(main())
