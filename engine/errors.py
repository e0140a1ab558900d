"""One exception hierarchy for the whole package (DESIGN.md §4).

Every error the package raises on purpose derives from :class:`CBSError`, and also from the
builtin a caller would naturally catch (``ValueError`` for bad input, ``ImportError`` for a
missing optional solver, ...). Messages are written in one voice, naming the argument, the
allowed range and the value given, e.g.::

    The 'sparsity' argument of prune() must be in [0, 1). Got 1.5.

``CBSError`` and ``InvalidProblemError`` live in ``formulations.errors`` (the lowest layer raises
them too) and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from formulations.errors import CBSError, InvalidProblemError, invalid_argument

__all__ = [
    "CBSError",
    "InvalidProblemError",
    "InvalidOptionError",
    "DataNotFoundError",
    "CheckpointError",
    "SolverUnavailableError",
    "SolverError",
    "invalid_option",
    "first_line",
    "one_line",
    "RunError",
    "describe_value",
]


class InvalidOptionError(CBSError, ValueError):
    """An argument or option is outside its allowed range or set."""


class DataNotFoundError(CBSError, FileNotFoundError):
    """A data set, checkpoint or problem file that was asked for does not exist."""


class CheckpointError(CBSError, ValueError):
    """A checkpoint file exists but does not match the model it is loaded into."""


class SolverUnavailableError(CBSError, ImportError):
    """A solver needs an optional package that is not installed; the message names the extra."""


class RunError(CBSError):
    """A failure after every input was accepted (a full disk, a solver that fails or lies): not the user's
    input, so the CLI exits 1 (not 2) with its one-line message."""


class SolverError(RunError, RuntimeError):
    """A solver failed or returned an answer that fails the engine's checks (DESIGN.md §3)."""


def invalid_option(argument: str, where: str, allowed: str, got: Any) -> InvalidOptionError:
    """The standard rejection of a bad argument.

    >>> str(invalid_option("sparsity", "prune()", "in [0, 1)", 1.5))
    "The 'sparsity' argument of prune() must be in [0, 1). Got 1.5."
    """
    return invalid_argument(InvalidOptionError, argument, where, allowed, got)  # type: ignore[return-value]


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name (third-party messages can run
    to pages; ours show one line)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (just ``Type`` when it has no message)."""
    text = first_line(exc)
    return type(exc).__name__ if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def describe_value(value: Any) -> str:
    """A value in a message: "None", "a tensor of shape (2, 3)", "a tuple of 3", "a dict of 2", "a int"."""
    import torch  # here, so that the error classes import without it

    if value is None:
        return "None"
    if isinstance(value, (tuple, list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
