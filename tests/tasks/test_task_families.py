"""Built-in task families: determinism, splits, worked completions that verify, and the prompt format."""

import json
import random
import re

import pytest

from components.tasks import (
    FAMILIES,
    PROMPT_TEMPLATE,
    Problem,
    SandboxPool,
    get_family,
    make_split,
    verify_batch,
)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_seed_gives_same_problems_and_other_seed_differs(name):
    first, again, other = make_split(name, 30, seed=7), make_split(name, 30, seed=7), make_split(name, 30, seed=8)
    assert first == again
    assert [p.id for p in first] != [p.id for p in other]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_split_is_duplicate_free_and_disjoint_from_excluded_ids(name):
    train = make_split(name, 200, seed=0)
    held_out = make_split(name, 100, seed=0, exclude_ids={p.id for p in train})
    assert len({p.id for p in train}) == 200
    assert len({p.id for p in held_out}) == 100
    assert not {p.id for p in train} & {p.id for p in held_out}


def test_split_larger_than_the_family_can_yield_raises():
    tiny = get_family("list_ops", ops=("sum",), min_length=2, max_length=2, max_value=1)  # [0,1] or [1,0]
    assert len(make_split(tiny, 2, seed=0)) == 2
    with pytest.raises(ValueError, match="only 2 of 3 distinct"):
        make_split(tiny, 3, seed=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_correct_completion_verifies_and_wrong_one_does_not(name):
    problems = make_split(name, 60, seed=3)
    pool = SandboxPool(workers=1)  # never started: built-in families verify in-process
    right = verify_batch([(p, p.completion()) for p in problems], sandbox=pool)
    wrong = verify_batch([(p, p.completion(correct=False)) for p in problems], sandbox=pool)
    assert all(r.status == "ok" and r.correct for r in right), [r for r in right if not r.correct]
    assert all(r.status == "ok" and r.correct is False for r in wrong), [r for r in wrong if r.correct]
    assert all(p.answer != p.wrong_answer for p in problems)
    assert pool.calls == 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompt_is_the_template_and_completion_opens_think(name):
    problem = make_split(name, 1, seed=1)[0]
    assert problem.prompt == PROMPT_TEMPLATE.format(question=problem.question)
    assert problem.prompt.endswith("A:")
    assert re.fullmatch(r"<think>.+</think><answer>.+</answer>", problem.completion(), re.S)
    assert problem.completion().startswith("<think>") and problem.completion(False).startswith("<think>")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_knobs_keep_text_short(name):
    for problem in make_split(name, 200, seed=2):
        steps = problem.solution.rstrip(".").split(". ")
        assert 1 <= len(steps) <= 4, problem.solution
        assert len(problem.prompt) + len(problem.completion()) <= 200, problem


def test_arithmetic_has_the_asked_operands_and_one_step_per_operator():
    problem = get_family("arithmetic", min_operands=3, max_operands=3, max_value=9).sample(random.Random(0))
    assert problem.question.endswith(" = ?")
    operands = re.findall(r"\d+", problem.question)
    assert len(operands) == 3 and all(1 <= int(x) <= 9 for x in operands)
    assert len(problem.solution.split(". ")) == 2


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("arithmetic", {"min_operands": 2, "max_operands": 6, "max_value": 50}),
        ("countdown", {"min_numbers": 2, "max_numbers": 5, "max_number": 10}),
        ("linear_equation", {"max_coefficient": 3, "negative_coefficients": False}),
        ("list_ops", {"ops": ("max", "reverse"), "min_length": 4, "max_length": 6}),
    ],
)
def test_knobs_are_honoured(name, knobs):
    family = get_family(name, **knobs)
    for problem in make_split(family, 100, seed=5):
        numbers = [int(x) for x in re.findall(r"-?\d+", problem.question)]
        if name == "arithmetic":
            assert 2 <= len(numbers) <= 6 and max(numbers) <= 50
        elif name == "countdown":
            assert 2 <= len(problem.meta["numbers"]) <= 5 and max(problem.meta["numbers"]) <= 10
        elif name == "linear_equation":
            assert 2 <= numbers[0] <= 3
        else:
            assert problem.question.split()[0] in ("max", "reverse") and 4 <= len(numbers) <= 6


def test_unknown_family_or_knob_is_rejected_with_the_name():
    with pytest.raises(ValueError, match="unknown task family 'algebra'"):
        get_family("algebra")
    with pytest.raises(ValueError, match="max_operandz"):
        get_family("arithmetic", max_operandz=3)
    with pytest.raises(ValueError, match="min_operands"):
        get_family("arithmetic", min_operands=5, max_operands=3)


def test_problem_round_trips_through_json():
    for name in FAMILIES:
        problem = make_split(name, 1, seed=4)[0]
        again = Problem.from_dict(json.loads(json.dumps(problem.to_dict())))
        assert again == problem and again.meta == problem.meta


def test_arithmetic_ops_knob_limits_the_operators():
    import random as _random

    from components.tasks import get_family

    fam = get_family("arithmetic", ops="+-", max_operands=3, max_value=9)
    rng = _random.Random(3)
    for _ in range(200):
        q = fam.sample(rng).question
        assert "*" not in q and "(" not in q, q
    for bad in ("++", "-", "/"):
        with pytest.raises(ValueError, match="ops"):
            get_family("arithmetic", ops=bad)
