"""Two processes (torchrun through the local launcher, gloo on CPU) train like one process on the same
global batch: DDP and FSDP2 per-step losses match the single-process run within rtol 1e-5 (fp32; only
the order of the gradient sums differs)."""

from __future__ import annotations

import pytest

from components.refs import checkpoint as ckpt
from infra import storage
from infra.launch.local import LocalLauncher

from .conftest import micro_config, run_in_process, write_job

RTOL, ATOL = 1e-5, 1e-6


def step_losses(output_uri: str) -> list[float]:
    _, uri = ckpt.latest_checkpoint(output_uri)
    return storage.read_json(storage.join_uri(uri, ckpt.STATE_JSON))["history"]["loss"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(strategy, micro_dataset, store, tmp_path):
    common = {"steps": 8, "batch_size": 8, "micro_batch_size": 4, "checkpoint": {"every": 8}, "eval": {"every": 0}}
    single = run_in_process(micro_config(micro_dataset, **common), str(tmp_path / "one"), tmp_path / "w")
    want = step_losses(str(tmp_path / "one"))  # one process: 2 micro-batches of 4 per step

    config = micro_config(micro_dataset, **common, distributed={"strategy": strategy},
                          resources={"procs_per_node": 2})  # two processes: 1 micro-batch of 4 each
    plan, spec = write_job(config)
    lines: list[str] = []
    result = LocalLauncher().run(spec, on_log=lines.append)
    got = step_losses(plan.output_uri)

    assert any("rank 1/2" in line and "gloo" in line for line in lines), lines[-20:]
    assert len(got) == len(want) == 8
    assert got == pytest.approx(want, rel=RTOL, abs=ATOL)
    assert result.metrics["final_loss"] == pytest.approx(single["metrics"]["final_loss"], rel=RTOL)
    assert got[-1] < got[0] - 0.1  # it trained
    model, _ = ckpt.load_model(result.outputs["checkpoint"])  # the gathered model is complete
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in ckpt.load_model(single["outputs"]["checkpoint"])[0].parameters())
