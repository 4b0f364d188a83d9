"""A short GRPO run on the tiny test base, kept as a golden reward curve (torchtitan's tests/assets/losses).

The curve is the mean total reward of each step's 64 rollouts. Single-threaded float32 on the CPU is
deterministic, so on the machine that wrote it the run reproduces it exactly; elsewhere a different BLAS
can flip a sampled token now and then, and the trajectories drift apart slowly. The tolerance therefore
compares 5-step window means (0.08), and the first step (the same rollout of the same base) closely.
A behaviour change (the sign of the advantage, the clip, the aggregation, the sampling) moves the curve
well outside it. Regenerate after an intended change with `MOEFLOW_UPDATE_GOLDEN=1 pytest tests/rl/test_golden_curve.py`
and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from components.rl.config import GRPOConfig
from components.rl.rewards import RewardConfig
from components.rl.trainer import GRPOTrainer

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "rewards" / "grpo_tiny.json"
CONFIG = {"steps": 30, "prompts_per_step": 8, "group_size": 8, "temperature": 1.0, "aggregation": "dapo",
          "advantage_scale": "group", "optim": {"lr": 3e-4, "weight_decay": 0.0}}
REWARDS = {"max_completion_len": 24, "overlong_cache_len": 4}
SEED = 0
WINDOW, WINDOW_TOL, FIRST_TOL = 5, 0.08, 0.02


def windows(curve: list[float]) -> list[float]:
    return [sum(curve[i : i + WINDOW]) / WINDOW for i in range(0, len(curve), WINDOW)]


def pass_at_1(model, tokenizer, problems) -> float:
    from components.scoring.evaluate import evaluate

    res = evaluate(model, tokenizer, problems, n_samples=8, temperature=1.0, top_p=1.0, max_new_tokens=24,
                   greedy=False, batch_size=len(problems), keep_samples=False, seed=1)
    return res["metrics"]["pass@1"]


def test_grpo_reward_curve_matches_golden(tiny_base):
    model, tok, problems = tiny_base.load(), tiny_base.tokenizer(), tiny_base.problems()
    before = pass_at_1(model, tok, problems)
    trainer = GRPOTrainer(model, tok, problems, GRPOConfig(**CONFIG), RewardConfig(**REWARDS), seed=SEED)
    curve = [trainer.train_step()["reward/total"] for _ in range(CONFIG["steps"])]
    after = pass_at_1(model, tok, problems)
    if os.environ.get("MOEFLOW_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "what": "mean total reward per GRPO step on the tiny test base (tests/rl/conftest.py)",
            "config": CONFIG, "rewards": REWARDS, "seed": SEED,
            "tolerance": {"window": WINDOW, "window_mean_abs": WINDOW_TOL, "first_step_abs": FIRST_TOL},
            "reward": [round(x, 6) for x in curve]}, indent=1) + "\n")
        pytest.skip("golden curve rewritten")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == CONFIG and golden["rewards"] == REWARDS, "the golden curve is for another config"
    want = golden["reward"]
    assert len(curve) == len(want)
    assert curve[0] == pytest.approx(want[0], abs=FIRST_TOL)
    got_w, want_w = windows(curve), windows(want)
    for i, (g, w) in enumerate(zip(got_w, want_w, strict=True)):
        assert abs(g - w) <= WINDOW_TOL, f"steps {i * WINDOW + 1}-{(i + 1) * WINDOW}: {g:.3f} vs golden {w:.3f}"
    # and it is a learning curve: the last window beats the first, and pass@1 (8 samples of each of the
    # 90 problems, the same seeds before and after) rises
    assert got_w[-1] > got_w[0] + 0.03, got_w
    assert after > before + 0.05, (before, after)
