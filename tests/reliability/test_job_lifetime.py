"""A job never outlives its owner and never shares its output with a second writer (issue 17, item 3).

Real processes throughout: an *owner* process runs the local launcher exactly as the CLI's flow does (the
Prefect flow around it adds nothing to a job's lifetime), the job is the real `flows.job pretrain` on the
micro config, and the leases are held by real processes on a real filesystem and moto's S3 server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components.refs import checkpoint as ckpt
from infra import storage
from infra.storage.lease import Lease, LeaseHeld, read_lease
from tests.training.conftest import REPO, job_env, micro_config, run_job, write_job

OWNER = textwrap.dedent("""
    import sys
    from infra.contract import JobSpec
    from infra.launch.local import LocalLauncher, install_signal_handlers
    install_signal_handlers()
    try:
        LocalLauncher(grace_s=20).run(JobSpec.model_validate_json(sys.argv[1]))
    except KeyboardInterrupt as exc:
        print("interrupted:", exc, flush=True)
        sys.exit(130)
""")
HOLDER = "import sys, time; from infra.storage.lease import Lease; Lease(sys.argv[1]).acquire(); print('held', " \
         "flush=True); time.sleep(600)"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _owner_until(spec, done_uri: str) -> tuple[subprocess.Popen, int]:
    """Start an owner running `spec`; return it and its job's pid once `done_uri` exists."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, spec.model_dump_json()], cwd=REPO, env=job_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not storage.exists(done_uri):
        assert owner.poll() is None, owner.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{done_uri} did not appear"
        time.sleep(0.05)
    (job,) = _children(owner.pid)
    return owner, job


def test_sigterm_or_sigkill_of_the_owner_stops_the_job_and_a_rerun_resumes(micro_dataset, training_home, patch_env,
                                                                           tmp_path):
    config = micro_config(micro_dataset, steps=40, checkpoint={"every": 10, "keep": 4}, eval={"every": 20},
                          metrics={"log_every": 10})
    with patch_env(MOEFLOW_STORE_URI=str(tmp_path / "store")):
        plan, spec = write_job(config)
        step = lambda n: storage.join_uri(plan.output_uri, "checkpoints", f"step_{n:07d}", storage.MANIFEST_NAME)

        owner, job = _owner_until(spec, step(10))
        owner.send_signal(signal.SIGTERM)  # the CLI's handler stops the job first, then ends cleanly
        assert owner.wait(timeout=60) == 130
        assert "interrupted: SIGTERM: stopped 1 running job(s)" in owner.stdout.read()
        assert _gone(job, 5), "the job outlived its SIGTERMed owner"
        assert read_lease(plan.output_uri) is None  # the interrupted job released its lease

        owner, job = _owner_until(spec, step(20))
        owner.kill()  # SIGKILL: no handler runs; the job notices on its own
        owner.wait(timeout=30)
        assert _gone(job, 15), "the job outlived its SIGKILLed owner"
        killed_at = ckpt.latest_checkpoint(plan.output_uri)[0]
        assert 20 <= killed_at < 40 and not storage.exists(plan.result_uri)

        again = run_job(plan.job_config_uri)  # the stale lease of the killed job is taken over
        assert again.returncode == 0, again.stderr[-3000:]
        result = storage.read_json(plan.result_uri)
    assert result["metrics"]["resumed_from_step"] == killed_at


def test_two_writers_of_one_output_never_both_hold_it(store_base, tmp_path):
    """A live holder (another process) makes a second writer fail naming it; once the holder is SIGKILLed
    its lease is stale (dead pid on this host) and taken over; an expired heartbeat is taken over too."""
    output = storage.join_uri(store_base, "pretrain", "0123abcd")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, output], cwd=REPO, env=job_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"being written by pid {holder.pid} on host"):
            Lease(output).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with Lease(output) as lease:
        assert read_lease(output)["token"] == lease.token
        with pytest.raises(LeaseHeld):
            Lease(output).acquire()  # a live holder in this very process counts as well
    assert read_lease(output) is None

    expired = Lease(output, ttl_s=0.5, heartbeat_s=60).acquire()  # alive, but silent past its ttl
    time.sleep(0.6)
    with Lease(output, ttl_s=0.5) as taker:
        assert read_lease(output)["token"] == taker.token
    expired.release()  # not its lease any more: leaves nothing behind, deletes nothing of the taker's
