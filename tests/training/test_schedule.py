"""Learning-rate schedules: warm-up, cosine, warmup-stable-decay, and a scheduler state that round-trips."""

from __future__ import annotations

import io
import math

import pytest
import torch

from components.common.config import ScheduleConfig
from components.common.schedule import build_scheduler, lr_factor


def test_warmup_rises_linearly_from_above_zero_to_the_peak():
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    got = [lr_factor(s, 10, cfg) for s in range(6)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_cosine_decays_monotonically_to_the_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    got = [lr_factor(s, 12, cfg) for s in range(2, 13)]
    assert got[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(got, got[1:-1], strict=False))
    assert got[-1] == pytest.approx(0.1)
    mid = lr_factor(7, 12, cfg)  # halfway through the 10 decay steps
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape):
    cfg = ScheduleConfig(kind="wsd", warmup_steps=2, decay_fraction=0.25, min_lr_ratio=0.0, decay_shape=shape)
    total = 20
    got = [lr_factor(s, total, cfg) for s in range(total + 1)]
    assert got[2:15] == pytest.approx([1.0] * 13)  # stable until step 15 = 20 - 25% x 20
    assert got[15] == pytest.approx(1.0) and got[20] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(got[15:20], got[16:21], strict=True))
    if shape == "linear":
        assert got[17] == pytest.approx(1 - 2 / 5)


def test_scheduler_state_round_trips_through_weights_only_load():
    p = torch.nn.Parameter(torch.randn(3))
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3)
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, 10, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1.0)
    sched2 = build_scheduler(opt2, 10, cfg)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched2.get_last_lr()[0] == pytest.approx(lr_factor(5, 10, cfg))
    opt.step()
    opt2.step()
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
