"""Expert-load statistics, device peaks, the efficiency ledger and the end-of-run plots."""

from __future__ import annotations

import math

import pytest
import torch

from components.training.metrics import (
    datasheet_peak,
    device_peak,
    efficiency_ledger,
    expert_load_stats,
    format_ledger,
    load_heatmap_figure,
    loss_curve_figure,
)


def test_balanced_load_scores_one_and_a_collapsed_layer_scores_e():
    counts = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [8, 4, 4, 0]])
    s = expert_load_stats(counts)
    assert s["max_mean"].tolist() == pytest.approx([1.0, 4.0, 2.0])
    assert s["entropy"][0] == pytest.approx(1.0) and s["entropy"][1] == pytest.approx(0.0)
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert s["entropy"][2] == pytest.approx(want)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
     ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362.1e12), ("Some Future GPU", None)],
)
def test_gpu_peaks_come_from_the_datasheet_table(name, peak):
    assert datasheet_peak(name) == peak


def test_cpu_peak_is_measured_and_leaves_the_rng_alone():
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    peak, source = device_peak(torch.device("cpu"), bf16=False)
    assert peak > 1e8 and "measured" in source
    assert torch.equal(torch.rand(3), want)


def test_ledger_adds_up_devices_hours_cost_and_flops():
    ledger = efficiency_ledger(tokens=2_000_000, flops_per_token=3e6, device_seconds=1800, world_size=8,
                               price_per_device_hour=2.0, params={"total": 100, "active": 25, "mtp": 5},
                               tokens_per_s=1111.0, mfu=0.4, peak_flops=1e15, peak_source="datasheet",
                               device_name="H200")
    assert ledger["device_hours"] == pytest.approx(4.0)
    assert ledger["cost_usd"] == pytest.approx(8.0)
    assert ledger["flops"] == pytest.approx(6e12)
    assert ledger["device_hours_per_trillion_tokens"] == pytest.approx(4.0 / 2e6 * 1e12)
    assert ledger["active_fraction"] == pytest.approx(0.25)
    table = format_ledger(ledger)
    assert "| device-hours | 4 |" in table and "$8 at $2/device-hour" in table and "25 (25.0%)" in table
    assert "expert parallelism" not in table  # ep 1: no all-to-all row
    ep = efficiency_ledger(tokens=2_000_000, flops_per_token=3e6, device_seconds=1800, world_size=8,
                           price_per_device_hour=2.0, params={"total": 100, "active": 25, "mtp": 5},
                           tokens_per_s=1111.0, mfu=0.4, peak_flops=1e15, peak_source="datasheet",
                           device_name="H200", ep=8, all_to_all_bytes_per_step=3.5e9)
    assert ep["all_to_all_bytes_per_step"] == 3.5e9
    assert "| expert parallelism | ep 8: 3.5 GB all-to-all per step" in format_ledger(ep)


def test_plots_render_to_png(tmp_path):
    fig = loss_curve_figure({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.2], "val_step": [3], "val_loss": [2.4]})
    fig.savefig(tmp_path / "loss.png")
    fig = load_heatmap_figure(torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]), ["layer1", "mtp1"], "t")
    fig.savefig(tmp_path / "load.png")
    for name in ("loss.png", "load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
