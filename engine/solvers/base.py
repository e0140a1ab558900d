"""The solver contract (DESIGN.md §3).

A solver selects a support of size ``k`` for a :class:`~formulations.problem.BlockProblem`::

    class MySolver(SubsetSolver):
        name = "mine"
        capabilities = Capabilities(exact=False)

        def solve(self, problem, options, warm_start=None) -> SolveResult: ...

``warm_start`` is an optional boolean support (n,) of size k (exact solvers start from it and never
return worse). The engine (:func:`engine.solve.solve_block`) re-scores every answer with
``formulations.objective`` and checks it; solvers need not compute E(S) themselves.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from formulations.problem import BlockProblem

from ..errors import SolverUnavailableError
from ..options import SolveOptions
from ..result import SolveResult

__all__ = ["Capabilities", "SubsetSolver", "top_k_support", "select_top", "top_support", "spd_inverse"]


@dataclass(frozen=True)
class Capabilities:
    """What a solver can do.

    exact : it can prove optimality (only such solvers may return ``Status.OPTIMAL``).
    reports_bound : it returns its own lower bound.
    max_size : the largest block size n it accepts (None: no limit).
    warm_start : it uses a warm-start support.
    patterns : it honours a block's N:M pattern (``BlockProblem.pattern``); the engine refuses to give a
        patterned block to a solver without it, and checks every returned support against the pattern.
    requires : importable module names it needs.
    extra : the pip extra that installs them (``pip install 'cbs-prune[EXTRA]'``).
    description : one line for ``cbs solvers``.
    """

    exact: bool = False
    reports_bound: bool = False
    max_size: int | None = None
    warm_start: bool = False
    patterns: bool = False
    requires: tuple[str, ...] = ()
    extra: str | None = None
    description: str = ""

    def missing_modules(self) -> list[str]:
        """The required modules that cannot be imported here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


class SubsetSolver(ABC):
    """Base class of every solver. Subclasses set ``name`` and ``capabilities`` and implement ``solve``."""

    name: str = "unnamed"
    capabilities: Capabilities = Capabilities()

    @abstractmethod
    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Select ``problem.n_keep`` weights. See the module docstring."""

    def available(self) -> bool:
        """True when every required module is importable."""
        return not self.capabilities.missing_modules()

    def ensure_available(self) -> None:
        """Raise :class:`SolverUnavailableError` naming the extra when a required module is missing."""
        missing = self.capabilities.missing_modules()
        if missing:
            extra = self.capabilities.extra
            how = f"pip install 'cbs-prune[{extra}]'" if extra else f"pip install {' '.join(missing)}"
            raise SolverUnavailableError(
                f"Solver '{self.name}' needs {', '.join(missing)}, which is not installed. Install it with: {how}"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.name}'>"


def top_k_support(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (n,) keeping the k largest scores; ties broken by lower index (deterministic)."""
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.zeros(scores.size, dtype=bool)
    if k > 0:
        # stable argsort on -scores: equal scores keep the lower index first
        mask[np.argsort(-scores, kind="stable")[:k]] = True
    return mask


def select_top(problem: BlockProblem, scores: np.ndarray) -> np.ndarray:
    """Boolean support (n,) keeping the largest ``scores``: the ``n_keep`` largest overall, or under an N:M
    pattern the N largest of every group of M (ties: lower index)."""
    return top_support(scores, problem.n_keep, problem.pattern)


def top_support(scores: np.ndarray, k: int, pattern: tuple[int, int] | None) -> np.ndarray:
    """:func:`select_top` without a problem: the ``k`` largest, or the N largest of every group of M."""
    if pattern is not None:
        from formulations.patterns import top_per_group

        return top_per_group(scores, pattern)
    return top_k_support(scores, k)


def _symmetrize_lower(A: np.ndarray) -> np.ndarray:
    """Full symmetric matrix from one whose strictly upper triangle is zero (LAPACK/BLAS wrote only the
    lower one). A + Aᵀ with the diagonal restored: two passes, cheaper than np.tril masks at n ~ 4000."""
    d = np.diag(A).copy()
    S = A + A.T
    S[np.diag_indices_from(S)] = d
    return S


def spd_inverse(H: np.ndarray) -> np.ndarray:
    """Inverse of an SPD matrix (float64) by Cholesky (potrf + potri); eigh with clipping as a fallback."""
    c, info = lapack.dpotrf(H, lower=1, clean=1, overwrite_a=0)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=1, overwrite_c=1)
        if info == 0:
            return _symmetrize_lower(inv)
    # rounding made the factorisation fail: H is SPD in exact arithmetic, so clip the spectrum
    evals, evecs = np.linalg.eigh((H + H.T) / 2)
    floor = max(float(evals.max()), 1.0) * np.finfo(np.float64).eps
    evals = np.clip(evals, floor, None)
    return (evecs / evals) @ evecs.T
