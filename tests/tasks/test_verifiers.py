"""In-process verifiers: answer extraction, exact / numeric / int_list / countdown checks, batch API."""

import random

import pytest

from components.tasks import Problem, SandboxPool, extract_answer, get_family, verify, verify_batch
from components.tasks.verifiers import MAX_ANSWER_CHARS, parse_number


def _problem(answer, verifier="exact", tolerance=None, meta=None):
    return Problem(
        family="test", id="t", question="q", answer=answer, prompt="Q: q\nA:", solution=None,
        verifier=verifier, tolerance=tolerance, meta=meta or {},
    )  # fmt: skip


def _answer(text):
    return f"<think>working</think><answer>{text}</answer>"


COUNTDOWN = _problem("8*3-4", "countdown", meta={"numbers": [8, 3, 4], "target": 20})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>5</answer>", "5"),
        ("<answer> 1 </answer> then <answer>2</answer>", "2"),
        ("<answer>1<answer>2</answer>", "2"),
        ("<think>x</think><answer>\n 7 \n</answer>\n", "7"),
        ("<answer>5", None),
        ("5</answer>", None),
        ("<answer>  </answer>", None),
        ("no tags at all", None),
        ("</answer><answer>", None),
    ],
)
def test_extract_answer_reads_the_last_complete_pair(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion", ["<think>x</think>52", "<answer>52", "<answer></answer>", ""])
def test_malformed_answers_are_no_answer_and_wrong(completion):
    result = verify(_problem("52", "numeric"), completion)
    assert result.status == "no_answer" and result.correct is False


@pytest.mark.parametrize(
    ("answer", "reference", "tolerance", "correct"),
    [
        ("52", "52", None, True),
        ("52.0", "52", None, True),
        ("x = 52", "52", None, True),
        ("3/4", "0.75", None, True),
        ("-6/8", "-3/4", None, True),
        ("1.5e2", "150", None, True),
        ("51", "52", None, False),
        ("3.1416", "3.14159", 1e-4, True),
        ("3.15", "3.14159", 1e-4, False),
        ("fifty-two", "52", None, False),
        ("1/0", "52", None, False),
        ("1e999999999", "52", None, False),
        ("52 + 0", "52", None, False),
    ],
)
def test_numeric_verifier(answer, reference, tolerance, correct):
    result = verify(_problem(reference, "numeric", tolerance), _answer(answer))
    assert result.status == "ok" and result.correct is correct, result


def test_parse_number_never_evaluates_expressions():
    assert parse_number("2**10") is None
    assert parse_number("__import__('os')") is None
    assert parse_number("7") == 7


@pytest.mark.parametrize(
    ("answer", "correct"),
    [("Paris", True), ("  Paris\n", True), ("paris", False), ("Paris, France", False)],
)
def test_exact_verifier_normalises_whitespace_only(answer, correct):
    assert verify(_problem("Paris"), _answer(answer)).correct is correct


def test_exact_verifier_collapses_inner_whitespace():
    assert verify(_problem("New  York"), _answer("New\tYork")).correct is True


@pytest.mark.parametrize(
    ("answer", "correct"),
    [("[1,3,5]", True), ("[1, 3, 5]", True), ("1 3 5", True), ("1,3,5", True), ("[1,5,3]", False),
     ("[1,3]", False), ("[1,3,5.0]", False), ("one", False)],
)  # fmt: skip
def test_int_list_verifier_accepts_common_list_forms(answer, correct):
    assert verify(_problem("[1,3,5]", "int_list"), _answer(answer)).correct is correct


@pytest.mark.parametrize("answer", ["8*3-4", "4*(8-3)", "(8 - 3) * 4", "8*3-4 = 20", "3*8-4"])
def test_countdown_accepts_any_expression_reaching_the_target(answer):
    result = verify(COUNTDOWN, _answer(answer))
    assert result.status == "ok" and result.correct is True, result


@pytest.mark.parametrize("answer", ["8*3-4+4-4", "8+8+4", "4*4+4", "20", "5*4"])
def test_countdown_rejects_numbers_reused_or_not_given(answer):
    result = verify(COUNTDOWN, _answer(answer))
    assert result.correct is False and "uses numbers" in result.detail, result


def test_countdown_allows_a_number_as_often_as_it_is_given():
    problem = _problem("5*5-5", "countdown", meta={"numbers": [5, 5, 5], "target": 20})
    assert verify(problem, _answer("5*5-5")).correct is True
    assert verify(problem, _answer("5*5-5+5-5")).correct is False


@pytest.mark.parametrize(
    "answer",
    [
        "__import__('os').system('touch {marker}')",
        "(lambda: 20)()",
        "2**4+4",
        "8*3-4 if 1 else 0",
        "[8*3-4][0]",
        "0x14",
        "20.0",
        "-(-20)",
        "8*3-4; 1",
        "(" * 300 + "20" + ")" * 300,
    ],
)
def test_countdown_rejects_syntax_outside_the_whitelist_without_running_it(answer, tmp_path):
    marker = tmp_path / "ran"
    result = verify(COUNTDOWN, _answer(answer.format(marker=marker)))
    assert result.status == "ok" and result.correct is False, result
    assert not marker.exists()


def test_countdown_division_by_zero_and_exact_fractions():
    problem = _problem("", "countdown", meta={"numbers": [8, 3, 4, 6], "target": 2})
    assert verify(problem, _answer("8/(4-4)")).correct is False
    assert verify(problem, _answer("8/4")).correct is True
    assert verify(problem, _answer("(8/3)*(3/4)")).correct is False  # 3 used twice
    assert verify(problem, _answer("8/3*3/4")).correct is False  # 3 used twice
    assert verify(problem, _answer("6/3")).correct is True
    assert verify(problem, _answer("8/6*3-4+4")).correct is False  # 4 used twice


def test_countdown_claimed_value_must_be_the_target():
    assert verify(COUNTDOWN, _answer("8*3-4 = 21")).correct is False


def test_overlong_answer_is_wrong_without_being_checked():
    result = verify(_problem("1", "numeric"), _answer("1" * (MAX_ANSWER_CHARS + 1)))
    assert result.status == "ok" and result.correct is False and "longer" in result.detail


def test_broken_reference_is_an_error_not_a_wrong_answer():
    result = verify(_problem("not a number", "numeric"), _answer("5"))
    assert result.status == "error" and result.correct is None and "reference" in result.detail


def test_unknown_verifier_is_a_configuration_error():
    with pytest.raises(ValueError, match="unknown verifier 'fuzzy'"):
        verify_batch([(_problem("1", "fuzzy"), _answer("1"))])


def test_cheap_verifiers_never_start_the_sandbox():
    names = ["arithmetic", "countdown", "linear_equation", "list_ops"] * 25
    problems = [get_family(name).sample(random.Random(i)) for i, name in enumerate(names)]
    pool = SandboxPool(workers=1)
    results = verify_batch([(p, p.completion()) for p in problems], sandbox=pool)
    assert len(results) == 100 and all(r.correct for r in results)
    assert pool.calls == 0 and not pool._workers
