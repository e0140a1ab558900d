"""Budget allocation across blocks by loss curves (DESIGN.md §1, "Across blocks").

Blocks are independent given a budget k_b each (block-diagonal Fisher), and the quadratic models of all
blocks are in the same units (the loss), so the best split of a global budget K is

    min Σ_b E_b(k_b)   s.t.  Σ_b k_b ≤ K,  k_b ∈ grid_b,

a multiple-choice knapsack. E_b(k) is measured on a grid of k per block with nested supports (the k
largest OBS scores w_i²/[H⁻¹]_ii of the block, then the exact CBS-U update's E), and the knapsack is
solved exactly as a HiGHS MILP (:func:`engine.solvers.highs.solve_budget_allocation`, binary x_{b,j}, one
grid point per block). What the grid leaves of K is handed out by the steepest interpolated slope of
the curves, so Σ k_b = K exactly.

The grid is relative to the global density ρ = K/Σn_b: k = round(min(1, m·ρ)·n_b) for the multipliers
``GRID`` (plus the block's own global-magnitude share, so the MILP can always do at least as well as the
magnitude threshold on the measured points).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from formulations.allocation import allocate_global
from formulations.problem import BlockProblem

from .errors import invalid_option
from .update import batched_update

__all__ = ["Allocation", "loss_curves", "loss_curve_allocation", "GRID"]

#: multipliers of the global density ρ at which every block's loss curve is measured
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)


@dataclass
class Allocation:
    """k_b per block, the curves they came from, and how the knapsack went."""

    n_keep: list[int]
    grids: list[list[int]]
    curves: list[list[float]]
    objective: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly details for the stage record (no curves: they can be long)."""
        return {"allocation": "loss_curve", "allocation_objective": self.objective,
                "allocation_seconds": self.seconds, "grid_points": int(sum(len(g) for g in self.grids)), **self.extra}


def _scores(problem: BlockProblem) -> np.ndarray:
    from .solvers.woodfisher import obs_scores  # heavy only when asked for

    return obs_scores(problem)


def loss_curves(problems: list[BlockProblem], grids: list[list[int]]) -> list[list[float]]:
    """E_b(k) for every k of ``grids[b]`` (nested supports: the k largest OBS scores), float64."""
    out = []
    for p, ks in zip(problems, grids):
        order = np.argsort(-_scores(p), kind="stable")
        supports = []
        for k in ks:
            s = np.zeros(p.n, dtype=bool)
            s[order[:k]] = True
            supports.append(s)
        results = batched_update([p.with_n_keep(int(k)) for k in ks], supports)
        out.append([float(r.objective) for r in results])
    return out


def _grids(problems: list[BlockProblem], n_keep: int, magnitude_share: list[int]) -> list[list[int]]:
    total = sum(p.n for p in problems)
    rho = n_keep / total if total else 0.0
    grids = []
    for p, share in zip(problems, magnitude_share):
        ks = {int(round(min(1.0, m * rho) * p.n)) for m in GRID} | {int(share), 0}
        grids.append(sorted(k for k in ks if 0 <= k <= p.n))
    return grids


def loss_curve_allocation(problems: list[BlockProblem], n_keep: int, time_limit: float | None = None) -> Allocation:
    """k_b for every block with Σ k_b = ``n_keep``, from the blocks' loss curves (module docstring)."""
    from .solvers.highs import solve_budget_allocation

    total = sum(p.n for p in problems)
    if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)) or not 0 <= n_keep <= total:
        raise invalid_option("n_keep", "loss_curve_allocation()", f"an integer in [0, {total}]", repr(n_keep))
    start = time.perf_counter()
    share = allocate_global([np.abs(p.weights) for p in problems], int(n_keep))
    grids = _grids(problems, int(n_keep), share)
    curves = loss_curves(problems, grids)
    ks = solve_budget_allocation(list(zip([np.asarray(g) for g in grids], curves)), int(n_keep),
                                 time_limit=time_limit, at_most=True)
    ks = _fill(ks, grids, curves, [p.n for p in problems], int(n_keep))
    objective = float(sum(np.interp(k, g, c) for k, g, c in zip(ks, grids, curves)))
    magnitude = float(sum(np.interp(k, g, c) for k, g, c in zip(share, grids, curves)))
    return Allocation(ks, grids, curves, objective, time.perf_counter() - start,
                      extra={"magnitude_share_objective": magnitude})


def _fill(ks: list[int], grids: list[list[int]], curves: list[list[float]], sizes: list[int], n_keep: int) -> list[int]:
    """Hand out n_keep − Σ ks one weight at a time to the block whose (interpolated) curve falls fastest."""
    ks = list(ks)
    left = n_keep - sum(ks)

    def slope(b: int) -> float:
        if ks[b] >= sizes[b]:
            return np.inf
        return float(np.interp(ks[b] + 1, grids[b], curves[b]) - np.interp(ks[b], grids[b], curves[b]))

    while left > 0:
        # a block's slope is constant between its grid points: hand out up to the next grid point at once
        b = min(range(len(ks)), key=slope)
        nxt = next((k for k in grids[b] if k > ks[b]), sizes[b])
        step = max(1, min(left, nxt - ks[b], sizes[b] - ks[b]))
        ks[b] += step
        left -= step
    return ks
