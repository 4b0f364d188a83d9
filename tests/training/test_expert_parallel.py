"""Expert parallelism (`parallel.ep`) over gloo on loopback, real torchrun processes: 2 and 4 processes
equal the single-process model (logits, loss, every gradient, the gradient norm, the expert counts and
the balancing bias, within 1e-5 fp32), pretraining gives the same per-step losses at EP 1, 2 and 4, and a
checkpoint written at EP 2 resumes at EP 1 and EP 4 (the experts re-sharded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from components.refs import checkpoint as ckpt
from components.training.config import PretrainConfig
from infra import storage
from infra.launch.local import LocalLauncher

from .conftest import REPO, job_env, micro_config, run_in_process, write_job

TOL = 1e-5


def torchrun(nproc: int, out, cases: list[str]) -> dict:
    cmd = [sys.executable, "-W", "ignore::FutureWarning", "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), str(REPO / "tests/training/ep_worker.py"), str(out), *cases]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc, cases", [(2, ["2:ddp", "2:fsdp"]), (4, ["4:ddp", "2:ddp", "2:fsdp"])])
def test_expert_parallel_equals_one_process(nproc, cases, tmp_path):
    """ep x dp grids: 2 = 2x1, 4 = 4x1 and 2x2 (each expert shard on two data-parallel replicas), under
    DDP and FSDP2 (non-expert parameters sharded over the world, experts over their replicas)."""
    got = torchrun(nproc, tmp_path / "diffs.json", cases)
    assert set(got) == set(cases)
    for case, diffs in got.items():
        assert set(diffs) >= {"logits", "loss_parts", "grads", "grad_norm", "expert_counts", "bias", "state"}
        bad = {k: v for k, v in diffs.items() if not v <= TOL}
        assert not bad, f"{nproc} processes, ep:strategy {case}: {bad}"


def step_losses(output_uri: str, step: int | None = None) -> list[float]:
    ckpts = dict(ckpt.list_checkpoints(output_uri))
    uri = ckpts[step] if step is not None else ckpts[max(ckpts)]
    return storage.read_json(storage.join_uri(uri, ckpt.STATE_JSON))["history"]["loss"]


def test_pretraining_at_ep_1_2_4_and_resharded_resume(micro_dataset, store, tmp_path):
    common = {"steps": 20, "batch_size": 8, "micro_batch_size": 2, "checkpoint": {"every": 10, "keep": 2},
              "eval": {"every": 0, "max_rows": 8}}
    run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "ep1"), tmp_path / "w1")
    want = step_losses(str(tmp_path / "ep1"))
    assert len(want) == 20 and want[-1] < want[0] - 0.1  # it trained

    ep2 = micro_config(micro_dataset, **common, parallel={"ep": 2}, resources={"procs_per_node": 2})
    plan2, spec2 = write_job(ep2)
    lines: list[str] = []
    result2 = LocalLauncher().run(spec2, on_log=lines.append)
    assert any("expert parallel: ep 2 x dp 1" in line for line in lines), lines[-20:]
    assert step_losses(plan2.output_uri) == pytest.approx(want, rel=TOL, abs=TOL)
    assert result2.metrics["a2a_bytes_per_step"] > 0
    model, _ = ckpt.load_model(result2.outputs["checkpoint"])  # the published model has every expert
    assert model.layers[1].mlp.experts.w_gate.shape[0] == 8

    # resume the EP 2 run's step-10 checkpoint at EP 4 (4 processes, 2 experts each) and at EP 1
    step10 = dict(ckpt.list_checkpoints(plan2.output_uri))[10]
    ep4 = micro_config(micro_dataset, **common, parallel={"ep": 4}, resources={"procs_per_node": 4})
    plan4, spec4 = write_job(ep4)
    shutil.copytree(step10, storage.join_uri(ckpt.checkpoints_uri(plan4.output_uri), ckpt.step_name(10)))
    lines = []
    LocalLauncher().run(spec4, on_log=lines.append)
    assert any("resumed from" in line and "step 10 of 20" in line for line in lines), lines[-20:]
    assert step_losses(plan4.output_uri) == pytest.approx(want, rel=TOL, abs=TOL)

    resumed = tmp_path / "ep1-resumed"
    shutil.copytree(step10, resumed / ckpt.CHECKPOINTS_DIR / ckpt.step_name(10))
    run_in_process(micro_config(micro_dataset, **common), str(resumed), tmp_path / "w3")
    assert step_losses(str(resumed)) == pytest.approx(want, rel=TOL, abs=TOL)


def test_ep_config_errors_name_the_field(micro_dataset):
    with pytest.raises(ValueError, match=r"parallel.ep \(3\) must divide model.n_routed_experts"):
        PretrainConfig.model_validate(micro_config(micro_dataset, parallel={"ep": 3},
                                                   resources={"procs_per_node": 3}))
    with pytest.raises(ValueError, match=r"parallel.ep \(4\) must divide the number of processes"):
        PretrainConfig.model_validate(micro_config(micro_dataset, parallel={"ep": 4},
                                                   resources={"procs_per_node": 2}))
    legacy = PretrainConfig.model_validate(micro_config(micro_dataset, distributed={"strategy": "fsdp"}))
    assert legacy.parallel.strategy == "fsdp"  # the section's former name still reads
