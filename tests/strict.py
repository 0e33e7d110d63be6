"""Equality for comparing results with a reference: types, dict key order
and the sign of zero count, so 1, 1.0 and True are told apart, and so are
0.0 and -0.0."""

from __future__ import annotations

from typing import Any


def strict_equal(a: Any, b: Any) -> bool:
    """``a == b``, with the same types and dict key order at every depth."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a == 0.0:
        return str(a) == str(b)
    return bool(a == b)
