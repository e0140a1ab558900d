"""Greedy OBS backward elimination: remove one weight at a time, always the cheapest, re-optimising the rest.

**The step.** Let S be the current kept set and v the optimal update on it (v_P = 0; v minimises q on the
affine set {v_P = 0}). On that set q is a quadratic with Hessian H_SS, minimised at v_S, so

    q(u) = E(S) + ½ (u_S − v_S)ᵀ H_SS (u_S − v_S)      for every u with u_P = 0,

*whatever the gradient g* (g only moves the minimiser v, which already accounts for it). Adding the
constraint u_i = 0 (i ∈ S) is a single linear equality, so the exact increase and the new minimiser are

    ΔE_i = v_i² / (2 [H_SS⁻¹]_ii),
    v ← v − (v_i / [H_SS⁻¹]_ii) · H_SS⁻¹ e_i          (which sets v_i = 0),
    H_{S∖i}⁻¹ = [H_SS⁻¹ − H_SS⁻¹ e_i e_iᵀ H_SS⁻¹ / [H_SS⁻¹]_ii] with row/column i dropped (Schur complement).

At S = all weights, v = w − H⁻¹ g and E = −½ gᵀH⁻¹g. Each step removes argmin_i ΔE_i (ties: lowest index).

**Cost.** H⁻¹ is formed once (n×n, float64): O(n²) memory, hence ``max_size = 4096``. The rank-one
downdates are applied lazily in batches (as in OBC/GPTQ): the current column H_SS⁻¹ e_i is the stored
matrix's column minus the pending rank-one terms (O(m·b) for b pending), and every ``batch`` steps the b
pending terms are applied at once by one matrix product (BLAS-3); the removed rows/columns are
dropped whenever a quarter of the stored ones are gone. Total O(n³) flops at matrix-product speed
instead of memory-bound rank-one updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver
from .woodfisher import hessian_inverse

__all__ = ["GreedySolver", "EliminationPath", "obs_elimination"]


@dataclass(frozen=True)
class EliminationPath:
    """The record of a backward elimination.

    removed : (r,) int64, weights in the order they were removed.
    increases : (s,) float64, the claimed exact increase ΔE of each of the first s greedy steps
        (s = r unless the time limit cut the run short, after which the rest were removed in one shot).
    start_objective : E(all kept) = −½ gᵀH⁻¹g (0 when g = 0).
    completed : False when the deadline stopped the greedy steps early.
    """

    removed: np.ndarray
    increases: np.ndarray
    start_objective: float
    completed: bool

    @property
    def claimed_objective(self) -> float:
        """E(start) + Σ ΔE (exact only when ``completed``)."""
        return self.start_objective + float(self.increases.sum())


def obs_elimination(
    problem: BlockProblem, n_keep: int | None = None, batch: int = 64, deadline: float | None = None
) -> EliminationPath:
    """Run greedy OBS backward elimination from all n weights down to ``n_keep`` (default problem.n_keep).

    ``deadline`` is a ``time.perf_counter()`` value; past it, the remaining removals are the smallest
    current ΔE_i taken at once (the support stays feasible).
    """
    n = problem.n
    k = problem.n_keep if n_keep is None else int(n_keep)
    H_inv = hessian_inverse(problem)
    g = problem.gradient
    v_full = problem.weights.copy()
    start_objective = 0.0
    if g is not None:
        Hg = H_inv @ g
        v_full -= Hg
        start_objective = -0.5 * float(g @ Hg)
    removed: list[int] = []
    increases: list[float] = []
    if k >= n:
        return EliminationPath(np.zeros(0, np.int64), np.zeros(0), start_objective, True)

    # state over the `active` weights (global indices, ascending); `base` is H_SS⁻¹ before the pending terms
    active = np.arange(n)
    base = np.array(H_inv, order="F")  # a copy: the downdates write into it, and H⁻¹ may be shared by rows
    del H_inv
    v = v_full
    diag = np.diag(base).copy()
    alive = np.ones(n, dtype=bool)
    pending = np.empty((n, batch), order="F")  # columns c_t of the pending rank-one terms c_t c_tᵀ / p_t
    pivots = np.empty(batch)
    t = 0
    n_alive = n
    tiny = np.finfo(np.float64).tiny
    completed = True
    while n_alive > k:
        if deadline is not None and time.perf_counter() > deadline:
            completed = False
            break
        scores = np.where(alive, v * v / (2.0 * np.maximum(diag, tiny)), np.inf)
        i = int(np.argmin(scores))
        col = base[:, i].copy()
        if t:
            col -= pending[:, :t] @ (pending[i, :t] / pivots[:t])
        piv = max(float(col[i]), tiny)
        increases.append(float(v[i] * v[i] / (2.0 * piv)))
        removed.append(int(active[i]))
        v -= (v[i] / piv) * col
        v[i] = 0.0
        diag -= col * col / piv
        alive[i] = False
        n_alive -= 1
        pending[:, t] = col
        pivots[t] = piv
        t += 1
        if t == batch and n_alive > k:
            # apply the b pending downdates in one BLAS-3 call
            scaled = pending[:, :t] / pivots[:t]
            base = blas.dgemm(-1.0, scaled, pending[:, :t], beta=1.0, c=base, trans_b=1, overwrite_c=1)
            diag = np.where(alive, np.diag(base), diag)
            t = 0
            if n_alive <= 0.75 * alive.size:
                # drop the removed rows/columns only now and then: the copy costs as much as several flushes
                keep = np.flatnonzero(alive)
                base = base[np.ix_(keep, keep)].T  # symmetric, and the transpose of a C array is Fortran
                active, v, diag = active[keep], v[keep], diag[keep]
                alive = np.ones(keep.size, dtype=bool)
                pending = np.empty((keep.size, batch), order="F")
    if not completed:
        # time is up: take the rest in one shot by their current ΔE (still a feasible support)
        scores = np.where(alive, v * v / (2.0 * np.maximum(diag, tiny)), np.inf)
        order = np.argsort(scores, kind="stable")[: n_alive - k]
        removed.extend(int(active[j]) for j in order)
    return EliminationPath(
        np.asarray(removed, dtype=np.int64), np.asarray(increases, dtype=np.float64), start_objective, completed
    )


class GreedySolver(SubsetSolver):
    """Greedy OBS backward elimination (module docstring). Deterministic; O(n²) memory.

    Parameters
    ----------
    batch : number of rank-one downdates applied together (BLAS-3), an integer in [1, 4096].
    """

    name = "greedy"
    capabilities = Capabilities(
        max_size=4096,
        description="Greedy OBS backward elimination: remove the cheapest weight, update the rest, repeat.",
    )

    def __init__(self, batch: int = 64) -> None:
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or not 1 <= batch <= 4096:
            raise invalid_option("batch", "GreedySolver()", "an integer in [1, 4096]", repr(batch))
        self.batch = int(batch)

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Eliminate down to ``n_keep``; ``warm_start`` is ignored. A time limit finishes in one shot."""
        start = time.perf_counter()
        deadline = None if options.time_limit is None else start + options.time_limit
        path = obs_elimination(problem, batch=self.batch, deadline=deadline)
        support = np.ones(problem.n, dtype=bool)
        support[path.removed] = False
        claimed = path.claimed_objective
        return SolveResult(
            support=support,
            status=Status.FEASIBLE,
            termination=Termination.COMPLETED if path.completed else Termination.TIME_LIMIT,
            wall_time=time.perf_counter() - start,
            iterations=int(path.increases.size),
            solver=self.name,
            # the claimed value accumulates rounding over n − k downdates; the engine re-scores exactly
            extra={"claimed_objective": claimed if math.isfinite(claimed) else None},
        )
