"""Arithmetic for the ``calculate`` tool, without ``eval``.

tau-bench filters the expression to digits, ``+-*/().`` and spaces, then
evaluates it as Python and returns ``str(round(float(result), 2))``. The same
characters admit ``**`` and ``//``, so both are supported; the expression is
parsed with :mod:`ast` and walked, and only numeric literals, the four
operators (plus power and floor division) and calls (which fail, as calling a
number does) are accepted. Python's own operators do the arithmetic, so
results and error texts match upstream.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

_ALLOWED_TEXT = "0123456789+-*/(). "
_BINOPS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
# Upstream would compute 9**9**9 for minutes. Only integer powers can take
# that long (float powers are one operation, and overflow raises), so those
# whose result would exceed this many bits are refused; smaller ones run and,
# like upstream, fail in the float conversion when too large for a float.
_MAX_POWER_BITS = 1_000_000


# What upstream's eval says of anything but a string, as its tool answers it.
EVAL_NEEDS_A_STRING = "Error: eval() arg 1 must be a string, bytes or code object"


class CalcError(Exception):
    """An expression the evaluator refuses; the text becomes ``Error: <text>``."""


def _power(left: Any, right: Any) -> Any:
    if (
        type(left) is int
        and type(right) is int
        and right > 0
        and abs(left) > 1
        and right * math.log2(abs(left)) > _MAX_POWER_BITS
    ):
        raise CalcError("exponent too large")
    return operator.pow(left, right)


def _eval(root: ast.AST) -> Any:
    """The value of ``root``, walked with a stack of its own: a sum of a
    thousand terms nests a thousand deep, past Python's recursion limit,
    and upstream's ``eval`` computes it."""
    # (node, children_done): a node is pushed once to visit its children
    # (left before right, as Python evaluates) and once to combine them.
    stack: list[tuple[ast.AST, bool]] = [(root, False)]
    values: list[Any] = []
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, ast.Expression):
            stack.append((node.body, False))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            values.append(node.value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            if not children_done:
                stack += [(node, True), (node.operand, False)]
            else:
                v = values.pop()
                values.append(+v if isinstance(node.op, ast.UAdd) else -v)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            if not children_done:
                stack += [(node, True), (node.right, False), (node.left, False)]
            else:
                right = values.pop()
                left = values.pop()
                op = _power if isinstance(node.op, ast.Pow) else _BINOPS[type(node.op)]
                values.append(op(left, right))
        elif isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args):
            # "2(3 + 4)", models' implicit product: eval evaluates the callee
            # and the arguments (a division by zero there comes first), then
            # fails to call a number.
            if not children_done:
                stack.append((node, True))
                stack += [(a, False) for a in reversed(node.args)]
                stack.append((node.func, False))
            else:
                del values[len(values) - len(node.args) :]
                callee = values.pop()
                raise TypeError(f"'{type(callee).__name__}' object is not callable")
        elif isinstance(node, ast.Tuple):
            if not children_done:
                stack.append((node, True))
                stack += [(e, False) for e in reversed(node.elts)]
            else:
                count = len(node.elts)
                items = tuple(values[len(values) - count :])
                del values[len(values) - count :]
                values.append(items)
        else:
            raise CalcError("unsupported expression")
    return values[0]


def calculate(expression: Any) -> str:
    """Evaluate ``expression`` as tau-bench's ``calculate`` tool does.

    Models do send other JSON than a string. Upstream tests each item of
    whatever it got with ``item in "0123456789+-*/(). "`` (a substring test
    for strings, a TypeError for anything else, and iterating a number is
    one too; those raise here as there, for the episode to report), then
    hands what passed to ``eval``, which takes only strings.
    """
    if not all(item in _ALLOWED_TEXT for item in expression):
        return "Error: invalid characters in expression"
    if not isinstance(expression, str):
        return EVAL_NEEDS_A_STRING
    try:
        # eval, which tau-bench uses, strips leading spaces and tabs.
        source = expression.lstrip(" \t")
        try:
            tree = ast.parse(source, filename="<string>", mode="eval")
        except RecursionError:
            # Too deep to parse (a sum of thousands of terms): eval's own
            # compilation refuses it too, with its text; compiling runs
            # nothing. Only here, as compile warns of other things (2(3)).
            compile(source, "<string>", "eval")
            raise
        return str(round(float(_eval(tree)), 2))
    except Exception as e:
        return f"Error: {e}"
