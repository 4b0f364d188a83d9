"""Accuracy, format, overlong and steps rewards; verifier failures are counted, never scored as wrong silently."""

import pytest
import torch

import components.rl.rewards as rewards
from components.rl.rewards import RewardConfig, compute_rewards, format_reward, overlong_penalty, steps_reward
from components.tasks import Problem, VerifyResult, make_split


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>12+7=19.</think><answer>19</answer>", 1.0),
        ("  <think>\nsteps\n</think>\n <answer> 19 </answer>\n", 1.0),
        ("<think></think><answer>19</answer>", 1.0),
        ("<answer>19</answer>", 0.0),
        ("<think>x</think>19", 0.0),
        ("<answer>19</answer><think>x</think>", 0.0),
        ("<think>x</think><answer>19</answer><answer>20</answer>", 0.0),
        ("<think>x<think>y</think><answer>19</answer>", 0.0),
        ("<think>x</think><answer>  </answer>", 0.0),
        ("<think>x</think><answer>19</answer> and more", 0.0),
        ("so <think>x</think><answer>19</answer>", 0.0),
        ("<think>x</think>between<answer>19</answer>", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_overlong_penalty_ramps_over_the_cache_and_punishes_truncation():
    lengths = torch.tensor([1, 6, 7, 8, 10, 11, 3])
    truncated = torch.tensor([False, False, False, False, False, False, True])
    penalty = overlong_penalty(lengths, truncated, max_len=10, cache_len=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    hard = overlong_penalty(lengths, truncated, max_len=10, cache_len=0)
    torch.testing.assert_close(hard, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]))


def _arithmetic(question="8+3-2 = ?", solution="8+3=11. 11-2=9.", answer="9", family="arithmetic"):
    return Problem(family=family, id="p", question=question, answer=answer, prompt=question, solution=solution)


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        ("8+3=11. 11-2=9.", 1.0),
        (" 8 + 3 = 11.\n11-2=9 ", 1.0),  # whitespace inside and between steps does not matter
        ("8+3=11. 11-2=8.", 0.5),  # the second step is wrong
        ("8+3=10. 10-2=8.", 0.0),  # wrong from the first step on
        ("8+3=10. 11-2=9.", 0.0),  # a right step after a wrong one earns nothing
        ("8+3=11.", 0.5),  # stopped early
        ("8+3=11. 11-2=9. 9+0=9.", 1.0),  # a step beyond the chain costs nothing (the answer decides)
        ("3+8=11. 11-2=9.", 0.0),  # off the chain
        ("", 0.0),
    ],
)
def test_steps_reward_counts_the_right_steps_before_the_first_wrong_one(think, expected):
    assert steps_reward(_arithmetic(), f"<think>{think}</think><answer>9</answer>") == expected


def test_steps_reward_is_zero_without_a_format_or_a_canonical_solution():
    assert steps_reward(_arithmetic(), "<think>8+3=11. 11-2=9.</think>9") == 0.0  # broken format
    assert steps_reward(_arithmetic(), "8+3=11. 11-2=9. <answer>9</answer>") == 0.0
    countdown = make_split("countdown", 1, seed=0)[0]  # many right expressions: no canonical chain
    assert steps_reward(countdown, countdown.completion()) == 0.0
    user = _arithmetic(family="user", solution=None)
    assert steps_reward(user, "<think>8+3=11. 11-2=9.</think><answer>9</answer>") == 0.0
    for p in make_split("arithmetic", 20, seed=3):  # every generated reference earns the full reward
        assert steps_reward(p, p.completion()) == 1.0
        assert steps_reward(p, p.completion(correct=False)) < 1.0


def test_compute_rewards_adds_the_weighted_steps_reward():
    problem = _arithmetic()
    texts = ["<think>8+3=11. 11-2=9.</think><answer>9</answer>", "<think>8+3=11. 11-2=8.</think><answer>8</answer>",
             "<think>8+3=10. 10-2=8.</think><answer>8</answer>"]
    cfg = RewardConfig(format_weight=0.0, steps_weight=2.0, max_completion_len=20, overlong_cache_len=4)
    batch = compute_rewards([problem] * 3, texts, [10, 10, 10], [False] * 3, cfg)
    torch.testing.assert_close(batch.steps, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(batch.total, torch.tensor([3.0, 1.0, 0.0]))
    assert batch.metrics()["reward/steps"] == pytest.approx(0.5)
    off = compute_rewards([problem] * 3, texts, [10, 10, 10], [False] * 3, cfg.model_copy(update={"steps_weight": 0.0}))
    torch.testing.assert_close(off.total, torch.tensor([1.0, 0.0, 0.0]))


def test_compute_rewards_combines_weighted_components():
    problems = make_split("arithmetic", 4, seed=0)
    texts = [
        problems[0].completion(),  # right, well formed
        problems[1].completion(correct=False),  # wrong, well formed
        f"<answer>{problems[2].answer}</answer>",  # right, no think block
        "I think it is 5",  # no answer at all
    ]
    cfg = RewardConfig(accuracy_weight=1.0, format_weight=0.5, overlong_weight=2.0, max_completion_len=20,
                       overlong_cache_len=8)  # fmt: skip
    batch = compute_rewards(problems, texts, [5, 14, 20, 25], [False, False, False, True], cfg)
    torch.testing.assert_close(batch.accuracy, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(batch.format, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(batch.overlong, torch.tensor([0.0, -0.25, -1.0, -1.0]))
    torch.testing.assert_close(batch.total, torch.tensor([1.5, 0.0, -1.0, -2.0]))
    assert (batch.n_timeout, batch.n_error, batch.n_no_answer) == (0, 0, 1)
    metrics = batch.metrics()
    assert metrics["reward/accuracy"] == pytest.approx(0.5) and metrics["verifier/no_answer"] == 1.0


def test_verifier_failures_get_no_accuracy_and_are_counted(monkeypatch):
    outcomes = [
        VerifyResult(True, "ok"),
        VerifyResult(None, "timeout", "no result within 5 s"),
        VerifyResult(None, "error", "worker died"),
        VerifyResult(None, "timeout", "no result within 5 s"),
    ]
    seen = {}

    def fake_verify_batch(items, timeout_s, *, sandbox=None):
        seen["timeout_s"] = timeout_s
        return outcomes

    monkeypatch.setattr(rewards, "verify_batch", fake_verify_batch)
    problems = make_split("linear_equation", 4, seed=1)
    texts = [p.completion() for p in problems]
    batch = compute_rewards(problems, texts, torch.tensor([3, 3, 3, 3]), torch.zeros(4, dtype=torch.bool),
                            RewardConfig(verify_timeout_s=5.0))  # fmt: skip
    assert batch.accuracy.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (batch.n_timeout, batch.n_error) == (2, 1)
    assert batch.metrics()["verifier/timeouts"] == 2.0 and batch.verify == outcomes
    assert seen["timeout_s"] == 5.0


def test_misaligned_inputs_are_rejected():
    problems = make_split("list_ops", 2, seed=2)
    with pytest.raises(ValueError, match="2 problems, 2 completions, 3 lengths"):
        compute_rewards(problems, ["a", "b"], [1, 2, 3], [False, False], RewardConfig())


def test_config_rejects_a_cache_longer_than_the_limit():
    with pytest.raises(ValueError, match="overlong_cache_len"):
        RewardConfig(max_completion_len=32, overlong_cache_len=32)
    with pytest.raises(ValueError, match="unknown_weight"):
        RewardConfig(unknown_weight=1.0)
