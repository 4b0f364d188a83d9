"""Answer verifiers and the batch API that RL, rejection sampling and evaluation call.

Where a verifier runs: the line between "safe in-process" and "needs the sandbox process"
-------------------------------------------------------------------------------------------
In-process (`sandboxed=False`) are only verifiers written here in plain Python whose work on model text is
bounded by construction: whitespace normalisation and string comparison (`exact`), regex-checked number
parsing with capped digit and exponent lengths into `Fraction` (`numeric`), a regex-checked integer list
(`int_list`), and the character-whitelisted, AST-whitelisted, exponent-free evaluator of `safe_expr`
(`countdown`). None of them executes, imports or evaluates model text, and every answer is capped at
`MAX_ANSWER_CHARS`, so each takes microseconds: they run inline in `verify_batch`, with no process round
trip (RL verifies ~100 samples per step). Their timeout is their bounded cost.

Sandboxed (`sandboxed=True`) is anything that hands model text to a library that may `eval` it or whose
cost is unbounded: `symbolic` (sympy's `parse_expr` calls `eval`, and `simplify` can run for minutes) and
any verifier registered later with `sandboxed=True`. Those calls go to `SandboxPool` worker processes,
each under `timeout_s` from when it starts; a stuck worker is killed and replaced. Workers run confined (a
clean environment without credentials, an empty temporary directory, no root, file limits; see
`sandbox`) and answer in JSON, which `verify_batch` accepts only as (bool, str). As defence in depth the
symbolic verifier also whitelists tokens and gives sympy's eval no builtins.

A verifier never silently scores 0 when it could not decide: `VerifyResult.status` is "ok" (correct is
True/False), "no_answer" (no non-empty <answer>...</answer>: correct is False, the model's fault),
"timeout" or "error" (correct is None: the verifier failed; callers count these separately).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from components.tasks.problem import Problem, extract_answer
from components.tasks.safe_expr import ExpressionError, evaluate, literals, parse_arithmetic
from components.tasks.sandbox import SandboxPool, default_sandbox

DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000
MAX_SYMBOLIC_CHARS = 300

# check(answer, reference, tolerance, meta) -> (correct, detail). A check raises only for a broken
# reference or a bug (reported as status "error"); a bad answer is (False, why).
CheckFn = Callable[[str, str, "float | None", Mapping[str, Any]], tuple[bool, str]]


@dataclass(frozen=True)
class VerifyResult:
    correct: bool | None
    status: Literal["ok", "timeout", "error", "no_answer"]
    detail: str = ""


@dataclass(frozen=True)
class Verifier:
    """A named check. Sandboxed checks must be module-level functions (pickled by reference)."""

    name: str
    check: CheckFn
    sandboxed: bool


# -- plain-Python parsing (safe in-process) -----------------------------------------------------------
_NUMBER = re.compile(r"[+-]?(?:\d{1,100}(?:\.\d{0,100})?|\.\d{1,100})(?:[eE][+-]?\d{1,3})?")
_FRACTION = re.compile(r"([+-]?\d{1,100})\s*/\s*([+-]?\d{1,100})")
_VAR_PREFIX = re.compile(r"[A-Za-z]\w{0,15}\s*=\s*")
_INT = re.compile(r"[+-]?\d{1,30}")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def parse_number(text: str) -> Fraction | None:
    """Exact value of an int, decimal/scientific float (exponent <= 3 digits) or "p/q"; None otherwise.

    A leading "x =" is accepted ("x = 5" reads as 5). Never evaluates anything.
    """
    text = _VAR_PREFIX.sub("", text.strip(), count=1).strip()
    if m := _FRACTION.fullmatch(text):
        numerator, denominator = int(m[1]), int(m[2])
        return None if denominator == 0 else Fraction(numerator, denominator)
    if _NUMBER.fullmatch(text):
        return Fraction(text)
    return None


def parse_int_list(text: str) -> list[int] | None:
    """[1, 3, 5] / [1,3,5] / 1 3 5 / 1,3,5 -> [1, 3, 5]; None if anything else is in the text."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items = [item for item in re.split(r"[,\s]+", text) if item]
    if not all(_INT.fullmatch(item) for item in items):
        return None
    return [int(item) for item in items]


# -- checks ---------------------------------------------------------------------------------------------
def check_exact(answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    ok = normalize_whitespace(answer) == normalize_whitespace(reference)
    return ok, "matches" if ok else "differs"


def check_numeric(answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    expected = parse_number(reference)
    if expected is None:
        raise ValueError(f"reference answer {reference!r} is not a number")
    got = parse_number(answer)
    if got is None:
        return False, "answer is not a number"
    if got == expected:
        return True, "equal"
    ok = abs(got - expected) <= Fraction(tolerance or 0)
    return ok, "within tolerance" if ok else f"off by {_approximate(got - expected)}"


def _approximate(value: Fraction) -> str:
    """`value` as a short float string; beyond float's range (an answer such as 1e999) a bound instead of
    an OverflowError, so that an absurd answer is a wrong answer, not a verifier error."""
    try:
        return f"{float(value):g}"
    except OverflowError:
        return f"{'-' if value < 0 else ''}more than 1e308"


def check_int_list(answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    expected = parse_int_list(reference)
    if expected is None:
        raise ValueError(f"reference answer {reference!r} is not a list of integers")
    got = parse_int_list(answer)
    if got is None:
        return False, "answer is not a list of integers"
    return got == expected, "same list" if got == expected else "different list"


def check_countdown(answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    """Expression over meta["numbers"] (each at most as often as given) that equals meta["target"].

    An optional "= N" suffix is allowed when N is the target.
    """
    numbers, target = list(meta["numbers"]), Fraction(meta["target"])
    expression, _, claimed = answer.partition("=")
    if claimed.strip() and parse_number(claimed) != target:
        return False, f"claims {claimed.strip()!r}, target is {target}"
    try:
        tree = parse_arithmetic(expression)
    except ExpressionError as exc:
        return False, f"rejected: {exc}"
    overused = Counter(literals(tree)) - Counter(numbers)
    if overused:
        return False, f"uses numbers not given or more often than given: {sorted(overused.elements())}"
    try:
        value = evaluate(tree)
    except ZeroDivisionError:
        return False, "division by zero"
    return value == target, f"evaluates to {value}"


# -- symbolic (sandboxed: sympy parses with eval) --------------------------------------------------------
_SYMPY_FUNCTIONS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "asin": "asin", "acos": "acos", "atan": "atan",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "exp": "exp", "log": "log", "ln": "log",
    "sqrt": "sqrt", "Abs": "Abs", "abs": "Abs", "pi": "pi", "E": "E", "I": "I", "oo": "oo",
}  # fmt: skip
_SYMBOLIC_TOKEN = re.compile(r"\s+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?|[A-Za-z][A-Za-z0-9]*|\*\*|[-+*/^()]")
_VARIABLE = re.compile(r"[A-Za-z][0-9]*")


def symbolic_syntax_error(text: str) -> str | None:
    """Why `text` may not reach sympy (None if it may): only numbers, + - * / ^ **, parentheses,
    one-letter variables (optionally with digits: x, y2) and the functions/constants in _SYMPY_FUNCTIONS.
    Pure Python; used in-process to validate references and in the worker before parsing."""
    if len(text) > MAX_SYMBOLIC_CHARS:
        return f"longer than {MAX_SYMBOLIC_CHARS} characters"
    position = 0
    while position < len(text):
        match = _SYMBOLIC_TOKEN.match(text, position)
        if match is None:
            return f"character not allowed: {text[position]!r}"
        token = match[0]
        if token[0].isalpha() and token not in _SYMPY_FUNCTIONS and not _VARIABLE.fullmatch(token):
            return f"name not allowed: {token!r}"
        position = match.end()
    return None if text.strip() else "empty"


def _sympy_parse(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    reason = symbolic_syntax_error(text)
    if reason is not None:
        raise ExpressionError(reason)
    namespace: dict[str, Any] = {"__builtins__": {}}
    for name in ("Symbol", "Function", "Integer", "Float", "Rational"):
        namespace[name] = getattr(sympy, name)
    for name, target in _SYMPY_FUNCTIONS.items():
        namespace[name] = getattr(sympy, target)
    transformations = standard_transformations + (implicit_multiplication, convert_xor)
    return parse_expr(text, local_dict={}, global_dict=namespace, transformations=transformations)


def check_symbolic(answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    """Equivalence by sympy: simplify(a - b) == 0, else a.equals(b) (numeric testing). With a
    tolerance and no free symbols, |a - b| <= tolerance. Runs only in a sandbox worker."""
    import sympy

    expected = _sympy_parse(_VAR_PREFIX.sub("", reference.strip(), count=1))
    try:
        got = _sympy_parse(_VAR_PREFIX.sub("", answer.strip(), count=1))
    except Exception as exc:  # the model's text: any parse failure is a wrong answer
        return False, f"unparseable answer: {type(exc).__name__}: {exc}"[:300]
    if not isinstance(got, sympy.Expr):
        return False, "answer is not an expression"
    if tolerance is not None and not got.free_symbols and not expected.free_symbols:
        try:
            gap = abs(complex(sympy.N(got - expected, 30)))
        except (TypeError, ValueError, OverflowError):  # oo, zoo, nan, beyond float: no finite difference
            return False, "difference is not a finite number"
        return gap <= tolerance, f"differs by {gap:g}"
    if sympy.simplify(got - expected) == 0:
        return True, "difference simplifies to 0"
    if got.equals(expected) is True:
        return True, "equal by numeric testing"
    return False, "not equivalent"


VERIFIERS: dict[str, Verifier] = {
    v.name: v
    for v in (
        Verifier("exact", check_exact, sandboxed=False),
        Verifier("numeric", check_numeric, sandboxed=False),
        Verifier("int_list", check_int_list, sandboxed=False),
        Verifier("countdown", check_countdown, sandboxed=False),
        Verifier("symbolic", check_symbolic, sandboxed=True),
    )
}


def register_verifier(verifier: Verifier, *, replace: bool = False) -> None:
    """Add a verifier. Anything that parses model text with a library that may eval, or whose cost is
    not bounded, must be registered with sandboxed=True."""
    if verifier.name in VERIFIERS and not replace:
        raise ValueError(f"verifier {verifier.name!r} already exists (pass replace=True to override)")
    VERIFIERS[verifier.name] = verifier


def get_verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}") from None


# -- batch API ----------------------------------------------------------------------------------------------
def _check_in_worker(check: CheckFn, answer: str, reference: str, tolerance: float | None, meta: Mapping[str, Any]):
    """Runs in a sandbox worker: the check's (correct, detail) as the JSON-ready [bool, str]."""
    correct, detail = check(answer, reference, tolerance, meta)
    return [bool(correct), str(detail)]


def _result_from_worker(value: Any) -> VerifyResult:
    """A worker's reply is untrusted: anything but [bool, str] is a verifier error."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], bool) and isinstance(value[1], str):
        return VerifyResult(value[0], "ok", value[1])
    return VerifyResult(None, "error", f"malformed verifier reply: {value!r}"[:500])


def _run_inline(verifier: Verifier, answer: str, problem: Problem) -> VerifyResult:
    try:
        correct, detail = verifier.check(answer, problem.answer, problem.tolerance, problem.meta)
    except Exception as exc:
        return VerifyResult(None, "error", f"{verifier.name}: {type(exc).__name__}: {exc}"[:500])
    return VerifyResult(bool(correct), "ok", detail)


def verify_batch(
    items: Sequence[tuple[Problem, str]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    sandbox: SandboxPool | None = None,
) -> list[VerifyResult]:
    """Verify (problem, completion text) pairs; the answer is the last <answer>...</answer>.

    Pass the completion alone, not prompt + completion (the prompt's instruction line holds tags too).

    In-process verifiers run inline; sandboxed ones are deduplicated (a GRPO group often repeats an
    answer) and run in `sandbox` (default: the shared pool), each under `timeout_s`. An unknown verifier
    name is a configuration error and raises ValueError before anything runs.
    """
    verifiers = [get_verifier(problem.verifier) for problem, _ in items]
    results: list[VerifyResult | None] = [None] * len(items)
    sandboxed: dict[tuple[str, str, str, float | None, str], list[int]] = {}
    for index, ((problem, completion), verifier) in enumerate(zip(items, verifiers, strict=True)):
        answer = extract_answer(completion)
        if answer is None:
            results[index] = VerifyResult(False, "no_answer", "no non-empty <answer>...</answer>")
        elif len(answer) > MAX_ANSWER_CHARS:
            results[index] = VerifyResult(False, "ok", f"answer longer than {MAX_ANSWER_CHARS} characters")
        elif not verifier.sandboxed:
            results[index] = _run_inline(verifier, answer, problem)
        else:
            meta_key = json.dumps(problem.meta, sort_keys=True, default=str)
            key = (verifier.name, answer, problem.answer, problem.tolerance, meta_key)
            sandboxed.setdefault(key, []).append(index)

    if sandboxed:
        pool = sandbox if sandbox is not None else default_sandbox()
        calls = []
        for (name, answer, reference, tolerance, _), indices in sandboxed.items():
            meta = dict(items[indices[0]][0].meta)
            calls.append((_check_in_worker, (VERIFIERS[name].check, answer, reference, tolerance, meta)))
        for indices, outcome in zip(sandboxed.values(), pool.run_many(calls, timeout_s), strict=True):
            if outcome.status == "ok":
                result = _result_from_worker(outcome.value)
            else:
                result = VerifyResult(None, outcome.status, outcome.detail)
            for index in indices:
                results[index] = result
    return results  # type: ignore[return-value]


def verify(
    problem: Problem,
    completion: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    sandbox: SandboxPool | None = None,
) -> VerifyResult:
    """Verify one completion (see `verify_batch`)."""
    return verify_batch([(problem, completion)], timeout_s, sandbox=sandbox)[0]
