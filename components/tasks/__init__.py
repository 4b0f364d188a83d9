"""Verifiable task families, user task files, answer extraction and sandboxed verification.

Importing this package never imports torch or sympy (sandbox workers import it).
"""

from components.tasks.families import Arithmetic, Countdown, LinearEquation, ListOps, TaskFamily
from components.tasks.problem import (
    COMPACT_TEMPLATE,
    PROMPT_TEMPLATE,
    Problem,
    extract_answer,
    format_completion,
    format_prompt,
    problem_id,
)
from components.tasks.registry import FAMILIES, check_families, get_family, make_split
from components.tasks.sandbox import SandboxOutcome, SandboxPool, default_sandbox
from components.tasks.user_tasks import TaskFileError, load_task_file, local_task_file
from components.tasks.verifiers import (
    DEFAULT_TIMEOUT_S,
    VERIFIERS,
    Verifier,
    VerifyResult,
    register_verifier,
    verify,
    verify_batch,
)

__all__ = [
    "COMPACT_TEMPLATE",
    "DEFAULT_TIMEOUT_S",
    "FAMILIES",
    "PROMPT_TEMPLATE",
    "VERIFIERS",
    "Arithmetic",
    "Countdown",
    "LinearEquation",
    "ListOps",
    "Problem",
    "SandboxOutcome",
    "SandboxPool",
    "TaskFamily",
    "TaskFileError",
    "Verifier",
    "VerifyResult",
    "default_sandbox",
    "extract_answer",
    "format_completion",
    "format_prompt",
    "check_families",
    "get_family",
    "load_task_file",
    "local_task_file",
    "make_split",
    "problem_id",
    "register_verifier",
    "verify",
    "verify_batch",
]
