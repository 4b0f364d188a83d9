"""Family registry and deterministic, duplicate-free problem splits."""

from __future__ import annotations

import random
from collections.abc import Iterable

from components.tasks.families import Arithmetic, Countdown, LinearEquation, ListOps, TaskFamily
from components.tasks.problem import Problem

FAMILIES: dict[str, type[TaskFamily]] = {
    family.name: family for family in (Arithmetic, Countdown, LinearEquation, ListOps)
}


def check_families(names: list[str], *, allow_empty: bool = True) -> list[str]:
    """`names` if each is a known family, listed once (a config validator's check); else a ValueError."""
    known = sorted(FAMILIES)
    bad = [f for f in names if f not in known]
    if bad:
        raise ValueError(f"unknown task families {bad}; choose from {known}")
    if not names and not allow_empty:
        raise ValueError("at least one task family is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"families are listed twice: {names}")
    return names


def get_family(name: str, **knobs: object) -> TaskFamily:
    """The family called `name`, with difficulty knobs (validated; unknown knobs are an error)."""
    try:
        family = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}") from None
    return family(**knobs)


def make_split(family: TaskFamily | str, n: int, seed: int, exclude_ids: Iterable[str] = ()) -> list[Problem]:
    """`n` distinct problems drawn with `random.Random(seed)`; same arguments -> same list.

    Problems whose id is in `exclude_ids` are skipped, so a held-out split made with the training split's
    ids excluded is disjoint from it. Raises ValueError when the family's knobs cannot yield `n` new
    problems in a reasonable number of draws (widen the knobs or ask for fewer).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    family = get_family(family) if isinstance(family, str) else family
    rng = random.Random(seed)
    seen = set(exclude_ids)
    problems: list[Problem] = []
    max_draws, draws = 20 * n + 1000, 0
    while len(problems) < n:
        if draws == max_draws:
            raise ValueError(
                f"{family.name}: only {len(problems)} of {n} distinct new problems in {max_draws} draws "
                f"with {family!r}; widen the family's knobs or ask for fewer"
            )
        draws += 1
        problem = family.sample(rng)
        if problem.id not in seen:
            seen.add(problem.id)
            problems.append(problem)
    return problems
