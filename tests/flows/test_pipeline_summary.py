"""The pipeline's closing summary: the gains it states and the table it prints (no stages run here)."""

from __future__ import annotations

import pytest

from flows.pipeline import gains, results_markdown

ROWS = {
    "base": {"architecture": "DeepseekV3ForCausalLM", "pass@1": 0.31125, "maj@k": 0.325, "greedy_accuracy": 0.465,
             "val_loss": 0.551,
             "active_params": 880384, "total_params": 1912576, "cost_usd": 0.0795},
    "rl": {"pass@1": 0.39125, "maj@k": 0.345, "greedy_accuracy": 0.515, "val_loss": 0.564,
           "active_params": 880384, "total_params": 1912576, "cost_usd": 0.2015},
    "student": {"architecture": "LlamaForCausalLM", "pass@1": 0.425, "maj@k": 0.455, "greedy_accuracy": 0.51,
                "val_loss": 0.544,
                "active_params": 416704, "total_params": 416704, "cost_usd": None},
}


def test_gains_are_points_over_the_base_and_the_share_the_student_keeps():
    g = gains(ROWS)
    assert g["rl_over_base"] == pytest.approx(0.08)
    assert g["student_over_base"] == pytest.approx(0.11375)
    assert g["student_kept"] == pytest.approx(0.11375 / 0.08)
    assert g["student_params"] == pytest.approx(416704 / 880384)


def test_no_share_of_a_gain_that_did_not_happen():
    rows = {**ROWS, "rl": {**ROWS["rl"], "pass@1": 0.30}}
    assert gains(rows)["student_kept"] is None
    assert gains({"base": ROWS["base"]})["rl_over_base"] is None


def test_the_table_shows_numbers_and_the_verdict_line():
    summary = {"eval": ROWS, "gains": gains(ROWS), "stages": {"pretrain": {"metrics": {}, "seconds": 150.0}},
               "releases": {"teacher": "/r/t", "student": "/r/s"}}
    text = results_markdown(summary)
    assert "| base | DeepseekV3ForCausalLM | 31.1% | 32.5% | 46.5% | 0.551 | 0.88M | 1.91M | $0.080 |" in text
    # no lineage, no cost
    assert "| student | LlamaForCausalLM | 42.5% | 45.5% | 51.0% | 0.544 | 0.42M | 0.42M | – |" in text
    assert ("RL: +8.0 points of pass@1 over the base; the student: +11.4 points, 142.2% of the teacher's gain, "
            "with 47.3% of its active parameters") in text
    assert "stage wall time: pretrain 150s" in text
