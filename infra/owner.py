"""A job's life is tied to the process that launched it (its *owner*: the CLI or a flow-run process).

The launcher passes `MOEFLOW_OWNER_PID` and `MOEFLOW_OWNER_START` (the owner's start time from /proc, so a
recycled pid is not mistaken for it) to the job; every job process -- torchrun's workers included, which
inherit the environment -- runs `start_owner_watchdog()`: when the owner is gone, however it died (SIGKILL
included), the job stops itself with SIGTERM (its normal interruption path: the last checkpoint stays and a
rerun resumes from it), and exits hard after a grace period if that does not end it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

OWNER_PID_ENV = "MOEFLOW_OWNER_PID"
OWNER_START_ENV = "MOEFLOW_OWNER_START"
log = logging.getLogger(__name__)


def process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a live process, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"  # no /proc (not Linux): alive, start unknown
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) > 19 and fields[0] == "Z":  # a zombie has already died
        return None
    return fields[19] if len(fields) > 19 else "?"


def alive(pid: int, start: str | None) -> bool:
    """Whether `pid` still names the process that started at `start` ("?" / None: any process with that pid)."""
    now = process_start(pid)
    return now is not None and (start in (None, "", "?") or now in ("?", start))


def owner_env() -> dict[str, str]:
    """The environment that ties a job to this process."""
    pid = os.getpid()
    return {OWNER_PID_ENV: str(pid), OWNER_START_ENV: process_start(pid) or "?"}


def start_owner_watchdog(*, every_s: float = 1.0, grace_s: float = 30.0) -> threading.Thread | None:
    """When this process has an owner (see the module docstring), watch it from a daemon thread."""
    raw = os.environ.get(OWNER_PID_ENV)
    if not raw:
        return None
    pid, start = int(raw), os.environ.get(OWNER_START_ENV)

    def watch() -> None:
        while alive(pid, start):
            time.sleep(every_s)
        log.error("the process that launched this job (pid %d) is gone: stopping; rerun the same command to "
                  "resume from the last checkpoint", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    thread = threading.Thread(target=watch, name="owner-watchdog", daemon=True)
    thread.start()
    return thread
