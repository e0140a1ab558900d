"""The result of an exact support solve and the caller-owned memo of recent ones.

:class:`SupportSolution` is what ``formulations.objective.optimal_update`` returns for a support;
:class:`UpdateMemo` remembers the last few of them for one block, so a support solved before is not
solved again. Both are re-exported by :mod:`formulations.objective`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import InvalidProblemError
from .problem import BlockProblem

__all__ = ["SupportSolution", "UpdateMemo", "MEMO_SIZE"]

#: exact solves an :class:`UpdateMemo` remembers (the last few supports of ``optimal_update``): a solver that
#: scores its final support and the engine's update of that support then share one O(N²k) solve instead of two
MEMO_SIZE = 4


@dataclass(frozen=True)
class SupportSolution:
    """The optimal update for a support: ``weights`` (n,) with zeros on P, ``objective`` = E(S),
    ``residual`` r = X(v − w) (N,), and the ``method`` used ("cholesky", "woodbury", "lstsq", "trivial";
    "cholesky+cg" and "woodbury+cg" for the mixed-precision solve of a large float32 block)."""

    weights: np.ndarray
    objective: float
    residual: np.ndarray
    method: str


def _memo_key(problem: BlockProblem, S: np.ndarray) -> tuple[bytes, float]:
    return hashlib.sha1(np.packbits(S).tobytes()).digest() + S.size.to_bytes(8, "little"), float(problem.damping)


def _copy(sol: SupportSolution) -> SupportSolution:
    return SupportSolution(weights=sol.weights.copy(), objective=sol.objective, residual=sol.residual.copy(),
                           method=sol.method)


class UpdateMemo:
    """The last ``size`` (default ``MEMO_SIZE``) exact solutions of ``optimal_update`` for ONE block.

    Owned by the caller and passed explicitly (``optimal_update(problem, S, memo)``,
    ``SolveOptions.memo``, ``engine.update.batched_update(..., memos)``); a :class:`BlockProblem` itself
    remembers nothing. Typical use: a solver scores its final support and the engine's update of that
    support then share one O(N²k) solve instead of two.

    Each entry is keyed by the support (a hash of the mask and its length), the damping λ, and the
    identity of the problem's ``gradient`` object (``None`` included), so the ``with_n_keep`` copies of a
    block (E(S) does not depend on k) share entries while a problem with another λ or another gradient
    never sees them. The weights and the factor are not part of the key: one memo must serve one block.
    Lookups return copies, so a caller may modify what it gets.
    """

    def __init__(self, size: int = MEMO_SIZE) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InvalidProblemError(f"The 'size' argument of UpdateMemo must be an integer >= 1. Got {size!r}.")
        self.size = int(size)
        self._entries: list[tuple[tuple[bytes, float], np.ndarray | None, SupportSolution]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"UpdateMemo({len(self._entries)}/{self.size} solutions)"

    def get(self, problem: BlockProblem, S: np.ndarray) -> SupportSolution | None:
        """A copy of the remembered solution for the boolean mask ``S`` (n,), or None."""
        key = _memo_key(problem, S)
        for k, g, sol in self._entries:
            if k == key and g is problem.gradient:
                return _copy(sol)
        return None

    def put(self, problem: BlockProblem, S: np.ndarray, sol: SupportSolution) -> None:
        """Remember (a copy of) ``sol`` for the boolean mask ``S``; the oldest entry beyond ``size`` goes."""
        self._entries.append((_memo_key(problem, S), problem.gradient, _copy(sol)))
        del self._entries[: -self.size]

    def clear(self) -> None:
        self._entries.clear()
