"""`python -m infra.launch.torchrun_wrapper ARGS...`: torchrun that keeps the job's own exit code.

A stage Job with several processes or nodes runs this (see `job_command` in infra/launch/k8s_render.py),
so that the podFailurePolicy sees the job's "retrying cannot help" exit codes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.contract import EXIT_CODE_FILE_ENV


def torchrun_main(argv: list[str]) -> int:
    """Run `torch.distributed.run ARGV` and return the job's own exit code.

    torchrun exits 1 whenever a worker fails, which would hide `EXIT_BAD_INPUT`/`EXIT_DIVERGED` from the
    podFailurePolicy. Workers get `MOEFLOW_EXIT_CODE_FILE`; `moeflow-job` writes its non-zero exit code
    there, and this wrapper exits with it. SIGTERM/SIGINT are forwarded to torchrun, which forwards
    them to its workers (the job's own handler then marks its MLflow run killed).
    """
    code_file = Path(tempfile.gettempdir()) / f"moeflow-exit-code-{os.getpid()}"
    code_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv],
                            env={**os.environ, EXIT_CODE_FILE_ENV: str(code_file)})

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if rc != 0:
        try:
            rc = int(code_file.read_text().strip())
        except (OSError, ValueError):
            pass
    code_file.unlink(missing_ok=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m infra.launch.torchrun_wrapper [torchrun arguments...]", file=sys.stderr)
        return 2
    return torchrun_main(argv)


if __name__ == "__main__":
    sys.exit(main())
