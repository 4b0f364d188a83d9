"""Sandboxed verification: sympy equivalence in worker processes, timeouts, crashes and recovery."""

import os
import time

import pytest

from components.tasks import VERIFIERS, Problem, SandboxOutcome, SandboxPool, Verifier, verify, verify_batch


def _sleepy_check(answer, reference, tolerance, meta):
    """Test-only verifier: sleeps `answer` seconds, then accepts (module-level so workers can import it)."""
    time.sleep(float(answer))
    return True, "slept"


def _crashing_check(answer, reference, tolerance, meta):
    os._exit(3)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=1) as pool:
        yield pool


@pytest.fixture
def extra_verifiers(monkeypatch):
    monkeypatch.setitem(VERIFIERS, "test_sleep", Verifier("test_sleep", _sleepy_check, sandboxed=True))
    monkeypatch.setitem(VERIFIERS, "test_crash", Verifier("test_crash", _crashing_check, sandboxed=True))


def _problem(answer, verifier="symbolic", tolerance=None):
    return Problem(
        family="test", id="t", question="q", answer=answer, prompt="Q: q\nA:", solution=None,
        verifier=verifier, tolerance=tolerance,
    )  # fmt: skip


def _answer(text):
    return f"<think>w</think><answer>{text}</answer>"


@pytest.mark.parametrize(
    ("answer", "reference", "tolerance", "correct"),
    [
        ("x^2 + 2x + 1", "(x+1)**2", None, True),
        ("(x+1)(x+1)", "x**2+2*x+1", None, True),
        ("sin(x)^2 + cos(x)^2", "1", None, True),
        ("y = 2x", "2*x", None, True),
        ("x**2 + 1", "(x+1)**2", None, False),
        ("sqrt(2)", "1.41421", 1e-4, True),
        ("sqrt(2)", "1.5", 1e-4, False),
        ("oo", "1.5", 1e-4, False),
        ("1/3", "0.333", None, False),
        ("x +* 2", "x", None, False),
    ],
)
def test_symbolic_equivalence(pool, answer, reference, tolerance, correct):
    result = verify(_problem(reference, tolerance=tolerance), _answer(answer), sandbox=pool)
    assert result.status == "ok" and result.correct is correct, result


@pytest.mark.parametrize(
    "payload",
    ["__import__('os').system('touch {marker}')", "open('{marker}', 'w')", "x.__class__", "lambda: 1"],
)
def test_symbolic_never_runs_model_text(pool, payload, tmp_path):
    marker = tmp_path / "ran"
    result = verify(_problem("x"), _answer(payload.format(marker=marker)), sandbox=pool)
    assert result.status == "ok" and result.correct is False and "not allowed" in result.detail, result
    assert not marker.exists()


def test_timeout_is_reported_and_the_pool_recovers(pool, extra_verifiers):
    restarts = pool.restarts
    started = time.monotonic()
    slow, fast = _problem("", "test_sleep"), _problem("", "test_sleep")
    results = verify_batch([(slow, _answer("30")), (fast, _answer("0"))], timeout_s=0.5, sandbox=pool)
    assert time.monotonic() - started < 15
    assert results[0].status == "timeout" and results[0].correct is None
    assert results[1].status == "ok" and results[1].correct is True
    assert pool.restarts == restarts + 1
    assert verify(_problem("(x+1)**2"), _answer("x^2+2x+1"), sandbox=pool).correct is True


def test_runaway_symbolic_answer_is_a_verifier_failure_not_a_score(pool):
    result = verify(_problem("2"), _answer("2^2^2^2^2^2"), timeout_s=0.5, sandbox=pool)
    assert result.correct is None and result.status in ("timeout", "error"), result
    assert verify(_problem("2"), _answer("1+1"), sandbox=pool).correct is True


def test_worker_crash_is_an_error_and_the_pool_recovers(pool, extra_verifiers):
    result = verify(_problem("", "test_crash"), _answer("1"), sandbox=pool)
    assert result.status == "error" and result.correct is None and "exit code 3" in result.detail
    assert verify(_problem("x"), _answer("x"), sandbox=pool).correct is True


def test_broken_reference_is_an_error(pool):
    result = verify(_problem("x +* 2"), _answer("x"), sandbox=pool)
    assert result.status == "error" and result.correct is None


def test_repeated_answers_in_a_batch_are_checked_once(pool):
    problem = _problem("(x+1)**2")
    calls = pool.calls
    results = verify_batch([(problem, _answer("x^2+2x+1"))] * 8 + [(problem, _answer("x"))] * 8, sandbox=pool)
    assert [r.correct for r in results] == [True] * 8 + [False] * 8
    assert pool.calls == calls + 2


class _InterruptsPickling:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_interrupted_batch_leaves_no_stale_call_for_the_next_one():
    with SandboxPool(workers=2, preload=()) as fresh:
        with pytest.raises(KeyboardInterrupt):
            fresh.run_many([(time.sleep, (0.3,)), (time.sleep, (_InterruptsPickling(),))], timeout_s=5)
        assert fresh.run_many([(abs, (-2,)), (abs, (-3,))], timeout_s=5) == [
            SandboxOutcome("ok", 2),
            SandboxOutcome("ok", 3),
        ]
