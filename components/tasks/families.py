"""Built-in verifiable task families: arithmetic, countdown, linear_equation, list_ops.

Each family is a frozen pydantic model whose fields are its difficulty knobs (so a stage config can hold
it and the Prefect UI can render it) and whose `sample(rng)` draws one `Problem` using only `rng`, so a
seed fixes the problems. Questions and worked solutions are short (a ~256-token context, a small BPE
vocabulary): 1-4 steps such as "12+7=19. 19*3=57. 57-5=52.".

Every problem also carries a plausible wrong worked solution (`completion(correct=False)`): one slip of
the kind found in web text (an arithmetic slip carried through, a wrong comparison, a swapped pair, a
wrong operator), always ending in a final answer that the family's verifier rejects.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.tasks.problem import Problem, format_prompt, problem_id

_MAX_DRAWS = 1000


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    assert op == "/" and value % operand == 0, "only exact division is generated"
    return value // operand


def _chain(start: int, steps: list[tuple[str, int]], slip: tuple[int, int] | None = None):
    """Worked left-to-right chain "a+b=c. c*d=e." -> (step texts, final value).

    slip=(j, delta): step j's result is written off by delta and the error is carried through.
    """
    value, texts = start, []
    for j, (op, operand) in enumerate(steps):
        result = _apply(value, op, operand)
        if slip is not None and slip[0] == j:
            result += slip[1]
        texts.append(f"{value}{op}{operand}={result}")
        value = result
    return texts, value


def _infix(start: int, steps: list[tuple[str, int]]) -> str:
    """Infix text of a left-to-right chain with only the parentheses precedence needs: (12+7)*3-5."""
    text, top = str(start), None
    for op, operand in steps:
        if op in "*/" and top in ("+", "-"):
            text = f"({text})"
        text, top = f"{text}{op}{operand}", op
    return text


def _sentences(steps: list[str]) -> str:
    return ". ".join(steps) + "."


def _slip_delta(rng: random.Random, value: int) -> int:
    """A small nonzero error that keeps a non-negative value non-negative."""
    return rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value < 0 or value + d >= 0])


def _int_list(values: list[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


class TaskFamily(BaseModel, ABC):
    """A generator of verifiable problems; fields are difficulty knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str]
    # True when the worked solution is the only way to write the reasoning step by step, so that a
    # completion's steps can be checked against it one by one (the RL `steps` reward)
    canonical_steps: ClassVar[bool] = False

    @abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """Draw one problem using only `rng`."""

    def _problem(
        self,
        question: str,
        answer: str,
        solution: str,
        wrong_solution: str,
        wrong_answer: str,
        verifier: str,
        meta: dict[str, Any] | None = None,
    ) -> Problem:
        return Problem(
            family=self.name,
            id=problem_id(question),
            question=question,
            answer=answer,
            prompt=format_prompt(question),
            solution=solution,
            wrong_solution=wrong_solution,
            wrong_answer=wrong_answer,
            verifier=verifier,
            meta=meta or {},
        )


def _check_range(low: int, high: int, what: str) -> None:
    if low > high:
        raise ValueError(f"min_{what} ({low}) must be <= max_{what} ({high})")


class Arithmetic(TaskFamily):
    """Multi-step integer arithmetic with + - *, e.g. "(12+7)*3-5 = ?" -> 52 (never negative)."""

    name: ClassVar[str] = "arithmetic"
    canonical_steps: ClassVar[bool] = True  # one left-to-right chain: "a+b=c. c-d=e."
    min_operands: int = Field(2, ge=2, le=8, description="fewest operands (steps = operands - 1)")
    max_operands: int = Field(4, ge=2, le=8, description="most operands")
    max_value: int = Field(20, ge=2, le=10_000, description="operands are drawn from 1..max_value")
    ops: str = Field("+-*", pattern=r"^[+\-*]+$",
                     description="operators to draw from, each once: any of '+', '-', '*' (e.g. '+-')")

    @model_validator(mode="after")
    def _ranges(self) -> Arithmetic:
        _check_range(self.min_operands, self.max_operands, "operands")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops {self.ops!r} names an operator twice")
        if self.ops == "-":
            raise ValueError("ops '-' alone cannot keep results non-negative; add '+' or '*'")
        return self

    def sample(self, rng: random.Random) -> Problem:
        start = value = rng.randint(1, self.max_value)
        steps: list[tuple[str, int]] = []
        for _ in range(rng.randint(self.min_operands, self.max_operands) - 1):
            op, operand = rng.choice(self.ops), rng.randint(1, self.max_value)
            if op == "-" and operand > value:
                op = "+" if "+" in self.ops else "*"
            steps.append((op, operand))
            value = _apply(value, op, operand)
        texts, answer = _chain(start, steps)
        slip_at = rng.randrange(len(steps))
        correct_at_slip = _chain(start, steps[: slip_at + 1])[1]
        wrong_texts, wrong = _chain(start, steps, (slip_at, _slip_delta(rng, correct_at_slip)))
        return self._problem(
            f"{_infix(start, steps)} = ?",
            str(answer),
            _sentences(texts),
            _sentences(wrong_texts),
            str(wrong),
            verifier="numeric",
        )


class Countdown(TaskFamily):
    """Reach a target from given numbers with + - * / (each number at most once), e.g.
    "Make 20 from 8 3 4 with + - * /, each at most once." -> "8*3-4". The reference solution uses every
    number; the verifier accepts any expression that uses each given number at most once."""

    name: ClassVar[str] = "countdown"
    min_numbers: int = Field(3, ge=2, le=6, description="fewest given numbers")
    max_numbers: int = Field(4, ge=2, le=6, description="most given numbers")
    max_number: int = Field(20, ge=2, le=100, description="numbers are drawn from 1..max_number")
    max_target: int = Field(200, ge=2, le=100_000, description="largest target")

    @model_validator(mode="after")
    def _ranges(self) -> Countdown:
        _check_range(self.min_numbers, self.max_numbers, "numbers")
        return self

    @staticmethod
    def _ops(value: int, operand: int) -> list[str]:
        """Operators that keep every intermediate a positive integer."""
        ops = ["+", "*"]
        if value > operand:
            ops.append("-")
        if operand > 1 and value % operand == 0:
            ops.append("/")
        return ops

    def _valid_chain(self, start: int, steps: list[tuple[str, int]]) -> bool:
        value = start
        for op, operand in steps:
            if op not in self._ops(value, operand):
                return False
            value = _apply(value, op, operand)
        return True

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(_MAX_DRAWS):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            order = rng.sample(numbers, len(numbers))
            value, steps = order[0], []
            for operand in order[1:]:
                op = rng.choice(self._ops(value, operand))
                steps.append((op, operand))
                value = _apply(value, op, operand)
            target = value
            if target > self.max_target or target in numbers:
                continue
            # The wrong solution changes one operator and carries the arithmetic through correctly.
            mutations = [(j, op) for j in range(len(steps)) for op in "+-*/" if op != steps[j][0]]
            rng.shuffle(mutations)
            for j, op in mutations:
                wrong_steps = steps[:j] + [(op, steps[j][1])] + steps[j + 1 :]
                if self._valid_chain(order[0], wrong_steps) and _chain(order[0], wrong_steps)[1] != target:
                    break
            else:
                continue
            question = f"Make {target} from {' '.join(map(str, numbers))} with + - * /, each at most once."
            return self._problem(
                question,
                _infix(order[0], steps),
                _sentences(_chain(order[0], steps)[0]),
                _sentences(_chain(order[0], wrong_steps)[0]),
                _infix(order[0], wrong_steps),
                verifier="countdown",
                meta={"numbers": numbers, "target": target},
            )
        raise RuntimeError(f"countdown: no valid problem in {_MAX_DRAWS} draws with {self!r}")


class LinearEquation(TaskFamily):
    """Solve a*x + b = c for integer x, e.g. "Solve 3x+5=20" -> 5 (|a| >= 2, b != 0)."""

    name: ClassVar[str] = "linear_equation"
    max_coefficient: int = Field(9, ge=2, le=1000, description="|a| is drawn from 2..max_coefficient")
    max_abs_b: int = Field(20, ge=1, le=10_000, description="b is drawn from ±1..max_abs_b")
    max_abs_x: int = Field(10, ge=1, le=10_000, description="x is drawn from -max_abs_x..max_abs_x")
    negative_coefficients: bool = Field(True, description="allow a < 0")

    def sample(self, rng: random.Random) -> Problem:
        a = rng.randint(2, self.max_coefficient) * (rng.choice((-1, 1)) if self.negative_coefficients else 1)
        b = rng.randint(1, self.max_abs_b) * rng.choice((-1, 1))
        x = rng.randint(-self.max_abs_x, self.max_abs_x)
        c = a * x + b
        question = f"Solve {a}x{b:+d}={c}"
        divisor = f"({a})" if a < 0 else str(a)
        move_b = f"{c}{-b:+d}"

        def worked(rhs: int) -> str:
            return _sentences([f"{a}x={move_b}={rhs}", f"x={rhs}/{divisor}={rhs // a}"])

        wrong_x = x + rng.choice((-2, -1, 1, 2))  # slip in c - b by a multiple of a, carried through
        return self._problem(question, str(x), worked(c - b), worked(a * wrong_x), str(wrong_x), verifier="numeric")


ListOp = Literal["sort", "reverse", "max", "sum"]


class ListOps(TaskFamily):
    """sort (ascending) / reverse / max / sum of a short list of distinct integers, e.g.
    "sort [5,3,8,1]" -> "[1,3,5,8]", "sum [5,3,8]" -> 16."""

    name: ClassVar[str] = "list_ops"
    ops: tuple[ListOp, ...] = Field(("sort", "reverse", "max", "sum"), min_length=1, description="operations")
    min_length: int = Field(3, ge=2, le=12, description="shortest list")
    max_length: int = Field(5, ge=2, le=12, description="longest list")
    max_value: int = Field(20, ge=1, le=10_000, description="values are distinct, drawn from 0..max_value")

    @model_validator(mode="after")
    def _ranges(self) -> ListOps:
        _check_range(self.min_length, self.max_length, "length")
        if self.max_value + 1 < self.max_length:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_length - 1 for distinct values")
        return self

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        values = rng.sample(range(self.max_value + 1), rng.randint(self.min_length, self.max_length))
        question = f"{op} {_int_list(values)}"
        if op in ("sort", "reverse"):
            result = sorted(values) if op == "sort" else values[::-1]
            wrong = list(result)
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]  # a swapped pair

            def worked(items: list[int]) -> str:
                if op == "sort":
                    return "Order: " + "<".join(map(str, items)) + "."
                return "Last to first: " + ",".join(map(str, items)) + "."

            return self._problem(
                question, _int_list(result), worked(result), worked(wrong), _int_list(wrong), "int_list"
            )
        if op == "max":
            # Running max; the wrong one keeps the running value when the true max comes in.
            def worked_max(slip: bool) -> tuple[str, int]:
                current, steps = values[0], []
                for value in values[1:]:
                    if slip and max(current, value) == max(values):
                        chosen = min(current, value)
                    else:
                        chosen = max(current, value)
                    steps.append(f"max({current},{value})={chosen}")
                    current = chosen
                return _sentences(steps), current

            (solution, answer), (wrong_solution, wrong_answer) = worked_max(False), worked_max(True)
            return self._problem(question, str(answer), solution, wrong_solution, str(wrong_answer), "numeric")
        steps = [("+", value) for value in values[1:]]
        texts, total = _chain(values[0], steps)
        slip_at = rng.randrange(len(steps))
        partial = _chain(values[0], steps[: slip_at + 1])[1]
        wrong_texts, wrong_total = _chain(values[0], steps, (slip_at, _slip_delta(rng, partial)))
        return self._problem(
            question, str(total), _sentences(texts), _sentences(wrong_texts), str(wrong_total), "numeric"
        )
