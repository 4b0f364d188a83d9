"""Learning-rate schedules as pure functions of the step, wrapped in a `LambdaLR` for the optimizer.

`lr_factor(step, total, cfg)` is the multiplier of the peak learning rate used for the update of step
`step + 1` (the scheduler is stepped after every optimizer step, as in torchtitan):

- warm-up (all kinds): `(step + 1) / (warmup + 1)` for `step < warmup` — never 0, so step 1 moves;
- `cosine`: from 1 down to `min_lr_ratio` along half a cosine over the steps after warm-up;
- `wsd` (warmup-stable-decay): 1 until the last `decay_fraction` of all steps, then down to
  `min_lr_ratio` (linear or cosine);
- `constant`: 1.
"""

from __future__ import annotations

import math

import torch

from components.common.config import ScheduleConfig


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total` steps."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(int(round(cfg.decay_fraction * total)), 1)
    decay_start = max(total - decay_steps, warmup)
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(total - decay_start, 1), 1.0)
    if cfg.decay_shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; its state_dict is plain data (the lambda itself is not saved)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
