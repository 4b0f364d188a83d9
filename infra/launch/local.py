"""Local backend: the job runs as a subprocess of this machine (through torchrun for several processes).

Output lines are streamed to `on_log` as they come (carriage-return progress updates too), the timeout
is enforced, and cancellation sends SIGTERM to the job's whole process group, then SIGKILL after a grace
period. The job's StageResult is read back from storage, exactly as the Kubernetes backend does.

The job runs in its own session (so its whole group can be signalled) but never outlives its owner: it
gets SIGTERM when the launching thread dies (PR_SET_PDEATHSIG, Linux), every job process watches the
owner's pid (`infra.owner`, which also covers torchrun's workers and a SIGKILLed owner), and
`install_signal_handlers()` (the CLI) stops running jobs before the owner exits on SIGTERM/SIGHUP/SIGINT.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from infra import storage
from infra.contract import JOB_ENTRY_MODULE, JobFailed, JobSpec, Launcher, LogFn, StageResult
from infra.owner import owner_env
from infra.settings import Settings, get_settings

log = logging.getLogger(__name__)
TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1
_running: dict[int, subprocess.Popen] = {}  # pid -> job process, for stop_running_jobs()
_running_lock = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the owner watchdog alone ties the job to us
        pass


def stop_running_jobs(grace_s: float = 10.0) -> int:
    """SIGTERM every job this process launched (their whole groups), SIGKILL what is left after `grace_s`.
    Returns how many were running."""
    with _running_lock:
        procs = list(_running.values())
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    return len(procs)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def install_signal_handlers() -> None:
    """On SIGTERM or SIGHUP (main thread only): stop the running jobs, then raise KeyboardInterrupt so the
    owner ends with its own clean message. SIGINT already raises KeyboardInterrupt; the CLI stops the jobs
    then."""

    def handler(signum: int, frame: object) -> None:
        stopped = stop_running_jobs()
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopped {stopped} running job(s)")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)


def job_command(spec: JobSpec) -> list[str]:
    """The command line for a spec: the job module, under torchrun when it asks for several processes."""
    job = ["-m", JOB_ENTRY_MODULE, spec.stage, "--config", spec.config_uri]
    r = spec.resources
    if r.nodes > 1:
        raise ValueError(f"job {spec.name}: the local launcher runs on one node; nodes={r.nodes} needs the "
                         "kubernetes launcher (set MOEFLOW_LAUNCHER=kubernetes)")
    if r.procs_per_node == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(r.procs_per_node), *job]


class LineSplitter:
    """Splits a job's output into log lines. Progress bars redraw with carriage returns: of those
    updates, one every `progress_every_s` seconds is passed on, and the bar's final state always is."""

    def __init__(self, tail: collections.deque[str], on_log: LogFn | None, progress_every_s: float = 5.0):
        self.tail, self.on_log, self.every = tail, on_log, progress_every_s
        self._last_progress = float("-inf")

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self.tail.append(line)
            if self.on_log:
                self.on_log(line)

    def _progress(self, raw: bytes) -> None:
        if not raw.strip():
            return
        now = time.monotonic()
        if now - self._last_progress >= self.every:
            self._last_progress = now
            self._emit(raw)

    def feed_stream(self, stream) -> None:
        buf = b""
        while chunk := stream.read1(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                *updates, final = line.split(b"\r")
                for u in updates:
                    self._progress(u)
                self._emit(final)
            *updates, buf = buf.split(b"\r")
            for u in updates:
                self._progress(u)
        self._emit(buf)


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, settings: Settings | None = None, *, grace_s: float = 10.0):
        self.settings = settings or get_settings()
        self.grace_s = grace_s

    def run(self, spec: JobSpec, *, on_log: LogFn | None = None,
            cancel: threading.Event | None = None) -> StageResult:
        cmd = job_command(spec)
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1", **owner_env()}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        log.info("starting job %s: %s", spec.name, " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        with _running_lock:
            _running[proc.pid] = proc
        try:
            return self._follow(proc, spec, tail, on_log, cancel)
        finally:
            with _running_lock:
                _running.pop(proc.pid, None)

    def _follow(self, proc: subprocess.Popen, spec: JobSpec, tail: collections.deque[str], on_log: LogFn | None,
                cancel: threading.Event | None) -> StageResult:
        reader = threading.Thread(target=self._pump, args=(proc, tail, on_log), daemon=True)
        reader.start()
        deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else None
        reason = None
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
            elif deadline is not None and time.monotonic() > deadline:
                reason = f"timed out after {spec.timeout_s:g}s"
            if reason:
                self._stop(proc)
                break
            time.sleep(0.1)
        proc.wait()
        reader.join(timeout=5)
        if reason:
            raise JobFailed(f"job {spec.name} ({spec.stage}) {reason}", exit_code=proc.returncode,
                            log_tail=list(tail))
        if proc.returncode != 0:
            raise JobFailed(f"job {spec.name} ({spec.stage}) failed with exit code {proc.returncode}",
                            exit_code=proc.returncode, log_tail=list(tail))
        try:
            return StageResult.model_validate(storage.read_json(spec.result_uri))
        except storage.StorageError as exc:
            raise JobFailed(f"job {spec.name} exited 0 but left no result at {spec.result_uri}: {exc}",
                            exit_code=0, log_tail=list(tail)) from exc

    @staticmethod
    def _pump(proc: subprocess.Popen, tail: collections.deque[str], on_log: LogFn | None) -> None:
        assert proc.stdout is not None
        LineSplitter(tail, on_log).feed_stream(proc.stdout)

    def _stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the job's process group (torchrun forwards it to its workers), then SIGKILL."""
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
