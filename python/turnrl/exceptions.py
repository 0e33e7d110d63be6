"""Exceptions raised by turnrl, including those from the Rust core.

Each also derives from the builtin a caller would naturally catch, so
``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["InvalidInputError", "TurnrlError", "TurnrlIOError", "UnknownNameError"]


class TurnrlError(Exception):
    """Base class of every error turnrl raises on purpose."""


class InvalidInputError(TurnrlError, ValueError):
    """Input that breaks a documented contract; the message names where."""


class UnknownNameError(TurnrlError, ValueError):
    """A name (estimator, format, tier) that is not registered."""


class TurnrlIOError(TurnrlError, OSError):
    """A file could not be read or written; the message names the path."""
