"""The root of cbs's exception hierarchy, kept in the lowest layer so that ``formulations`` (numpy
only) can raise the same classes the engine re-exports from ``engine.errors`` (DESIGN.md §4)."""

from __future__ import annotations

from typing import Any


class CBSError(Exception):
    """Base class of every error raised on purpose by cbs."""


class InvalidProblemError(CBSError, ValueError):
    """A block problem (X or F, w, λ, g, k) or a support is malformed: shapes, finiteness, ranges."""


def invalid_argument(error: type[Exception], argument: str, where: str, allowed: str, got: Any) -> Exception:
    """The one voice of every rejection: names the argument, where, the allowed range, the value.

    >>> str(invalid_argument(ValueError, "sparsity", "prune()", "in [0, 1)", 1.5))
    "The 'sparsity' argument of prune() must be in [0, 1). Got 1.5."
    """
    return error(f"The '{argument}' argument of {where} must be {allowed}. Got {got}.")
