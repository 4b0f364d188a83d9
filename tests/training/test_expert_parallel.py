"""Expert parallelism (`parallel.ep`) over gloo on loopback, real torchrun processes: 2 and 4 processes
equal the single-process model (logits, loss, every gradient, the gradient norm, the expert counts and
the balancing bias, within 1e-5 fp32), pretraining gives the same per-step losses at EP 1, 2 and 4, and a
checkpoint written at EP 2 resumes at EP 4 and EP 1 (the experts re-sharded).

Starting processes is what costs here, so there are two torchrun launches (2 and 4 processes), each
running its equivalence cases and then its pretraining runs (`tests/training/ep_worker.py`, the stage's
real `Trainer`); the job path under torchrun is covered by test_distributed.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from components.refs import checkpoint as ckpt
from components.training.config import PretrainConfig

from .conftest import REPO, job_env, micro_config, run_in_process

TOL = 1e-5
QUANTITIES = {"logits", "loss_parts", "grads", "grad_norm", "expert_counts", "bias", "state"}


def launch(nproc: int, spec: dict, tmp: Path) -> dict:
    (tmp / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-W", "ignore::FutureWarning", "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), str(REPO / "tests/training/ep_worker.py"), str(tmp / "spec.json"),
           str(tmp / "out.json")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        out, err = proc.communicate()
        pytest.fail(f"torchrun with {nproc} processes timed out:\n{err[-6000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return json.loads((tmp / "out.json").read_text())


def check_cases(nproc: int, got: dict, cases: list[str]) -> None:
    assert list(got) == cases
    for case, diffs in got.items():
        assert set(diffs) == QUANTITIES
        bad = {k: v for k, v in diffs.items() if not v <= TOL}
        assert not bad, f"{nproc} processes, ep:strategy {case}: {bad}"


def test_expert_parallel_equals_one_process(micro_dataset, store, tmp_path):
    common = {"steps": 20, "batch_size": 8, "micro_batch_size": 2, "checkpoint": {"every": 10, "keep": 2},
              "eval": {"every": 0, "max_rows": 8}}

    def run(ep: int, name: str, procs: int | None = None, strategy: str = "ddp") -> dict:
        config = micro_config(micro_dataset, **common, parallel={"ep": ep, "strategy": strategy},
                              resources={"procs_per_node": procs or ep})
        (tmp_path / name).mkdir()
        return {"config": config, "output": str(tmp_path / name / "out"), "workdir": str(tmp_path / name)}

    run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "ep1"), tmp_path / "w1")
    want = json.loads((Path(dict(ckpt.list_checkpoints(str(tmp_path / "ep1")))[20]) / ckpt.STATE_JSON)
                      .read_text())["history"]["loss"]
    assert len(want) == 20 and want[-1] < want[0] - 0.1  # it trained

    # 2 processes: ep x dp = 2 x 1 under DDP and FSDP2, then 20 steps at EP 2
    (tmp_path / "two").mkdir()
    two = launch(2, {"cases": ["2:ddp", "2:fsdp"], "runs": [run(2, "ep2")]}, tmp_path / "two")
    check_cases(2, two["cases"], ["2:ddp", "2:fsdp"])
    assert two["runs"][0]["loss"] == pytest.approx(want, rel=TOL, abs=TOL)
    assert two["runs"][0]["a2a_bytes_per_step"] > 0

    # 4 processes: 4 x 1 and 2 x 2 (each expert shard on two data-parallel replicas); 20 steps at EP 4; the
    # EP 2 run's step-10 checkpoint resumed at EP 4 (2 experts per rank instead of 4) and at EP 2 x dp 2
    # under FSDP2 (expert shards loaded into DTensors over their replicas)
    step10 = Path(dict(ckpt.list_checkpoints(str(tmp_path / "ep2" / "out")))[10])
    resumed = [run(4, "ep4-resumed"), run(2, "ep2x2-fsdp-resumed", procs=4, strategy="fsdp")]
    for r in resumed:
        shutil.copytree(step10, Path(r["output"]) / ckpt.CHECKPOINTS_DIR / step10.name)
    (tmp_path / "four").mkdir()
    four = launch(4, {"cases": ["4:ddp", "2:ddp", "2:fsdp"], "runs": [run(4, "ep4"), *resumed]}, tmp_path / "four")
    check_cases(4, four["cases"], ["4:ddp", "2:ddp", "2:fsdp"])
    assert four["runs"][0]["loss"] == pytest.approx(want, rel=TOL, abs=TOL)
    for r in four["runs"][1:]:
        assert r["resumed_from"] == 10
        assert r["loss"] == pytest.approx(want, rel=TOL, abs=TOL)

    # ... and at EP 1 (one process, all experts), in this process
    shutil.copytree(step10, tmp_path / "ep1-resumed" / ckpt.CHECKPOINTS_DIR / step10.name)
    run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "ep1-resumed"), tmp_path / "w3")
    got = json.loads((Path(dict(ckpt.list_checkpoints(str(tmp_path / "ep1-resumed")))[20]) / ckpt.STATE_JSON)
                     .read_text())["history"]["loss"]
    assert got == pytest.approx(want, rel=TOL, abs=TOL)


def test_ep_config_errors_name_the_field(micro_dataset):
    with pytest.raises(ValueError, match=r"parallel.ep \(3\) must divide model.n_routed_experts"):
        PretrainConfig.model_validate(micro_config(micro_dataset, parallel={"ep": 3},
                                                   resources={"procs_per_node": 3}))
    with pytest.raises(ValueError, match=r"parallel.ep \(4\) must divide the number of processes"):
        PretrainConfig.model_validate(micro_config(micro_dataset, parallel={"ep": 4},
                                                   resources={"procs_per_node": 2}))
    legacy = PretrainConfig.model_validate(micro_config(micro_dataset, distributed={"strategy": "fsdp"}))
    assert legacy.parallel.strategy == "fsdp"  # the section's former name still reads
