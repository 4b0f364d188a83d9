"""A stage's job output reaches its Prefect run's log (what the UI shows), throttled; a failed job's last
lines are in the failed state's message. The prep flow as deployed (preset + overrides) on Prefect's
ephemeral API, a real job subprocess, logs read back through the Prefect client."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from flows.common import JobLogForwarder

REPO = Path(__file__).resolve().parents[2]
SMALL = ["generators.tasks.n_per_family=150", "generators.generic_text.n_docs=100", "eval.n_per_family=20",
         "tokenizer.vocab_size=400", "packing.seq_len=64"]

SCRIPT = """
import json, sys
from flows.cli import _quiet_defaults
_quiet_defaults()
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from flows.prep import prep_flow

small, empty = json.loads(sys.argv[1]), sys.argv[2]
ok = prep_flow(preset="tiny", overrides=small, return_state=True)
bad = prep_flow(preset="tiny", overrides=small + ["sources=[{uri: '%s'}]" % empty], return_state=True)
APILogHandler().flush()
out = {}
with get_client(sync_client=True) as client:
    for name, state in (("ok", ok), ("bad", bad)):
        run = client.read_flow_run(state.state_details.flow_run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        out[name] = {"state": run.state.type.value, "message": run.state.message or "",
                     "logs": [log.message for log in logs]}
print(json.dumps(out))
"""


def test_stage_lines_reach_the_flow_run_log_and_a_failure_its_state(moeflow_home, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = {**os.environ, "PREFECT_HOME": str(Path(moeflow_home) / "prefect"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SMALL), str(empty)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ok, bad = out["ok"], out["bad"]
    assert ok["state"] == "COMPLETED", ok
    text = "\n".join(ok["logs"])
    assert "running as job moeflow-prep-" in text, text[-3000:]
    assert "prep INFO stage prep finished" in text, text[-3000:]  # the job's own lines
    assert bad["state"] == "FAILED", bad
    assert str(empty) in bad["message"] and "empty" in bad["message"], bad["message"]
    assert "last log lines" in bad["message"], bad["message"]
    assert any(str(empty) in line for line in bad["logs"]), bad["logs"][-20:]


class _Lines(logging.Logger):
    def __init__(self) -> None:
        super().__init__("lines")
        self.got: list[tuple[int, str]] = []

    def log(self, level, msg, *args, **kwargs):  # noqa: ANN001 - logging's signature
        self.got.append((level, msg % args))

    def info(self, msg, *args, **kwargs):  # noqa: ANN001
        self.log(logging.INFO, msg, *args)


def test_forwarder_throttles_but_keeps_errors_counts_and_the_last_lines():
    now = [0.0]
    logger = _Lines()
    fwd = JobLogForwarder(logger, per_second=3, tail=4, clock=lambda: now[0])
    for i in range(10):
        fwd(f"step {i}")
    fwd("ValueError: boom")
    now[0] = 1.5
    fwd("step 10")
    fwd("step 11")
    fwd.close()
    msgs = [m for _, m in logger.got]
    assert msgs[:3] == ["step 0", "step 1", "step 2"]
    assert (logging.ERROR, "ValueError: boom") in logger.got  # errors pass the throttle
    assert "... 7 job lines not shown (at most 3 a second)" in msgs
    assert msgs[-3:-1] == ["step 10", "step 11"]  # a new second: lines pass again
    assert msgs[-1] == "last 1 job lines not shown above:\nstep 9"  # tail=4: step 9 and the 3 sent after
