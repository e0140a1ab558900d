"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): keep the weights of largest |w_i| · ‖A_i‖.

On the layer-wise reconstruction objective a row's H = AᵀA/T, so ‖A_i‖ = √(T · H_ii) and the Wanda score
is |w_i| · √F_ii up to a constant factor per row, which does not change the ranking. The same score is
meaningful on a Fisher block (F_ii is the curvature of weight i), so this solver takes any block. It is the
diagonal approximation of the OBS score w_i² · H_ii ("pruning by weights and activations", without the
inverse Hessian). Selection only: the engine computes the update and E(S) of the support, like every solver.
"""

from __future__ import annotations

import time

import numpy as np

from formulations.problem import BlockProblem

from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, select_top

__all__ = ["WandaSolver", "wanda_scores"]


def wanda_scores(problem: BlockProblem) -> np.ndarray:
    """|w_i| · √F_ii, shape (n,), float64 (F without the damping, as Wanda uses the raw activations)."""
    diag = problem.derived("fisher_diagonal", lambda p: p.fisher_diagonal(), shared=True)  # once per layer
    return np.abs(problem.weights) * np.sqrt(np.clip(diag, 0.0, None))


class WandaSolver(SubsetSolver):
    """Keep the ``n_keep`` largest |w_i| · √F_ii (per group of M under an N:M pattern). O(N n)."""

    name = "wanda"
    capabilities = Capabilities(patterns=True, description="Keep the k largest |w_i|·sqrt(F_ii) (Wanda; no "
                                "inverse, honours N:M).")

    def __init__(self) -> None:
        pass

    def solve(self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
              ) -> SolveResult:
        """The top support of :func:`wanda_scores`; ``warm_start`` is ignored."""
        start = time.perf_counter()
        support = select_top(problem, wanda_scores(problem))
        return SolveResult(support=support, status=Status.FEASIBLE, termination=Termination.COMPLETED,
                           wall_time=time.perf_counter() - start, iterations=1, solver=self.name)
