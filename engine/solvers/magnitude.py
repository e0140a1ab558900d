"""Magnitude pruning: keep the k weights of largest |w_i| (the baseline every other method must beat).

Selection only; the engine computes the optimal update v*(S) and E(S) for the chosen support
(DESIGN.md §1), so "magnitude" here means *magnitude selection + CBS-U update*.
"""

from __future__ import annotations

import time

import numpy as np

from formulations.problem import BlockProblem

from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, select_top

__all__ = ["MagnitudeSolver"]


class MagnitudeSolver(SubsetSolver):
    """Keep the ``n_keep`` largest ``|w_i|`` (ties: lower index first). O(n log n), no curvature used."""

    name = "magnitude"
    capabilities = Capabilities(patterns=True,
                                description="Keep the k largest |w_i| (baseline; ignores curvature).")

    def __init__(self) -> None:
        pass

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Return the top-k support of ``|w|`` (per group under an N:M pattern); ``warm_start`` is ignored."""
        start = time.perf_counter()
        support = select_top(problem, np.abs(problem.weights))
        return SolveResult(
            support=support,
            status=Status.FEASIBLE,
            termination=Termination.COMPLETED,
            wall_time=time.perf_counter() - start,
            iterations=1,
            solver=self.name,
        )
