"""Local backend: the job runs as a subprocess of this machine (through torchrun for several processes).

Output lines are streamed to `on_log` as they come (carriage-return progress updates too), the timeout
is enforced, and cancellation sends SIGTERM to the job's whole process group, then SIGKILL after a grace
period. The job's StageResult is read back from storage, exactly as the Kubernetes backend does.
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
from infra.jobs import JobFailed, JobSpec, Launcher, LogFn, StageResult
from infra.settings import Settings, get_settings

log = logging.getLogger(__name__)
TAIL_LINES = 40


def job_command(spec: JobSpec) -> list[str]:
    """The command line for a spec: the job module, under torchrun when it asks for several processes."""
    job = ["-m", "infra.job", spec.stage, "--config", spec.config_uri]
    r = spec.resources
    if r.nodes > 1:
        raise ValueError(f"job {spec.name}: the local launcher runs on one node; nodes={r.nodes} needs the "
                         "kubernetes launcher (set MOEFLOW_LAUNCHER=kubernetes)")
    if r.procs_per_node == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(r.procs_per_node), *job]


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, settings: Settings | None = None, *, grace_s: float = 10.0):
        self.settings = settings or get_settings()
        self.grace_s = grace_s

    def run(self, spec: JobSpec, *, on_log: LogFn | None = None,
            cancel: threading.Event | None = None) -> StageResult:
        cmd = job_command(spec)
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        log.info("starting job %s: %s", spec.name, " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
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
        buf = b""
        while chunk := proc.stdout.read1(65536):
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail.append(line)
                    if on_log:
                        on_log(line)
        if buf.strip():
            line = buf.decode("utf-8", "replace").rstrip()
            tail.append(line)
            if on_log:
                on_log(line)

    def _stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the job's process group (torchrun forwards it to its workers), then SIGKILL."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
