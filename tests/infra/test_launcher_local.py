"""The local launcher runs the real job entry point (`python -m flows.job`) as a subprocess: log
streaming, StageResult read back from storage, failures with the job's last lines, timeout, cancel."""

from __future__ import annotations

import collections
import io
import threading
import time

import pytest

from flows import registry
from infra import storage
from infra.contract import EXIT_BAD_INPUT, JobFailed, JobSpec, Resources
from infra.launch.local import LineSplitter, LocalLauncher, job_command
from infra.plan import cached_result, job_payload

SMALL_PREP = {"generators": {"tasks": {"n_per_family": 40}, "generic_text": {"n_docs": 30}},
              "eval": {"n_per_family": 5}, "tokenizer": {"vocab_size": 300}, "packing": {"seq_len": 32}}


def _spec(config: dict, timeout_s: float | None = None) -> tuple[JobSpec, object]:
    plan = registry.get("prep").plan(config)
    storage.write_json(plan.job_config_uri, job_payload(plan, parent_run_id=None, flow_run_id=None))
    spec = JobSpec(stage="prep", name=plan.job_name, config_uri=plan.job_config_uri,
                   result_uri=plan.result_uri, timeout_s=timeout_s)
    return spec, plan


def test_success_streams_logs_and_returns_the_stage_result(moeflow_home):
    spec, plan = _spec(SMALL_PREP)
    lines: list[str] = []
    result = LocalLauncher().run(spec, on_log=lines.append)
    assert result.stage == "prep" and result.mlflow_run_id
    assert storage.is_published(result.outputs["dataset"])
    assert any("stage prep finished" in line for line in lines)
    assert cached_result(registry.get("prep").plan(SMALL_PREP)).outputs == result.outputs


def test_failure_carries_exit_code_and_last_log_lines(moeflow_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" * 5)
    spec, _ = _spec({**SMALL_PREP, "sources": [{"uri": str(bad)}]})
    with pytest.raises(JobFailed) as err:
        LocalLauncher().run(spec)
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert f"{bad}:1" in str(err.value)
    assert not storage.exists(spec.result_uri)


def test_timeout_stops_the_job(moeflow_home):
    spec, _ = _spec({**SMALL_PREP, "seed": 7}, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match="timed out after 1s"):
        LocalLauncher(grace_s=5).run(spec)
    assert time.monotonic() - t0 < 30
    assert not storage.exists(spec.result_uri)


def test_cancel_terminates_the_process_group(moeflow_home):
    spec, _ = _spec({**SMALL_PREP, "seed": 8})
    cancel = threading.Event()
    threading.Timer(1.5, cancel.set).start()
    with pytest.raises(JobFailed, match="cancelled"):
        LocalLauncher(grace_s=5).run(spec, cancel=cancel)
    assert not storage.exists(spec.result_uri)


def test_torchrun_is_used_for_several_processes_and_multi_node_is_refused():
    spec = JobSpec(stage="pretrain", name="j", config_uri="c", result_uri="r",
                   resources=Resources(procs_per_node=2))
    cmd = job_command(spec)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node" in cmd and "2" in cmd
    with pytest.raises(ValueError, match="nodes=2"):
        job_command(spec.model_copy(update={"resources": Resources(nodes=2)}))


def test_progress_redraws_are_throttled_but_lines_pass():
    out: list[str] = []
    splitter = LineSplitter(collections.deque(maxlen=5), out.append, progress_every_s=3600)

    class Stream(io.BytesIO):
        def read1(self, n: int = -1) -> bytes:  # the pipe API the launcher uses
            return self.read(min(n, 7))  # tiny chunks: lines and redraws split anywhere

    data = b"start\n" + b"".join(b"\rbar %d%%" % i for i in range(100)) + b"\rbar done\nend\n"
    splitter.feed_stream(Stream(data))
    assert out == ["start", "bar 0%", "bar done", "end"]
