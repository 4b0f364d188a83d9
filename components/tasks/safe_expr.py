"""Parse and evaluate model-written integer arithmetic (+ - * / and parentheses) without eval.

The text is first checked character by character (digits, + - * / parentheses, spaces only), then parsed
with `ast.parse(mode="eval")` (which only builds a syntax tree: nothing is executed) and every node is
checked against a whitelist. Evaluation walks the tree with exact `Fraction` arithmetic. Exponentiation is
not in the grammar and the length is capped, so the work is bounded: safe to run in-process.
"""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_EXPR_CHARS = 200
_ALLOWED_CHARS = frozenset("0123456789+-*/() \t")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class ExpressionError(ValueError):
    """The text is not a whitelisted arithmetic expression (the message says why)."""


def parse_arithmetic(text: str) -> ast.expr:
    """Syntax tree of `text`, or ExpressionError if it holds anything beyond ints, + - * / and ()."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    bad = sorted(set(text) - _ALLOWED_CHARS)
    if bad:
        raise ExpressionError(f"characters not allowed in an expression: {''.join(bad)!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExpressionError(f"not a valid expression: {type(exc).__name__}") from None
    _check(tree.body)
    return tree.body


def _check(node: ast.AST) -> None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        pass
    else:
        raise ExpressionError(f"syntax not allowed: {type(node).__name__}")


def literals(node: ast.expr) -> list[int]:
    """The integer literals of a checked tree, left to right."""
    if isinstance(node, ast.Constant):
        return [node.value]
    assert isinstance(node, ast.BinOp)
    return literals(node.left) + literals(node.right)


def evaluate(node: ast.expr) -> Fraction:
    """Exact value of a checked tree; ZeroDivisionError on division by zero."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)
    left, right = evaluate(node.left), evaluate(node.right)
    op = type(node.op)
    if op is ast.Add:
        return left + right
    if op is ast.Sub:
        return left - right
    if op is ast.Mult:
        return left * right
    return left / right
