"""Brute force: enumerate all C(n, k) supports and return the proven optimum (the test oracle).

Every support is scored from one dense H = XᵀX + λI (n×n, float64) by whichever side is smaller,
m = min(k, n − k) (both exact for any g; derivations below), in batches of supports (stacked m×m solves):

* **pruned side** (n − k ≤ k). With H⁻¹ and the unconstrained minimiser u = w − H⁻¹g,
  q(v) = −½ gᵀH⁻¹g + ½ (v − u)ᵀ H (v − u); minimising over v with v_P = 0 is a least-norm problem
  in the H-metric, giving

      E(S) = −½ gᵀH⁻¹g + ½ u_Pᵀ [(H⁻¹)_PP]⁻¹ u_P.

* **kept side** (k < n − k). With d = v − w, d_P = −w_P and the stationarity H_SS d_S = −b_S,
  b_S = g_S − H_SP w_P = g_S − (Hw)_S + H_SS w_S,

      E(S) = ½ w_Pᵀ H_PP w_P − g_Pᵀ w_P − ½ b_Sᵀ H_SS⁻¹ b_S,
      w_Pᵀ H_PP w_P = wᵀHw − 2 w_Sᵀ(Hw)_S + w_Sᵀ H_SS w_S.

The kept-side formula subtracts large terms, so every support whose batched score lies within a
rounding band of the best (up to 1,000 of them) is re-scored with
``formulations.objective.optimal_update`` and the minimum of those exact values wins (ties: first in
lexicographic order of the kept indices). The winner's objective is therefore the engine's E(S).
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from formulations.objective import SupportSolution, as_support, optimal_update
from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver
from .woodfisher import hessian_inverse, hessian_matrix

__all__ = ["BruteForceSolver", "side_combinations"]

#: supports scored per stacked solve (bounds memory at B·m² float64)
_BATCH = 16384
#: candidates re-scored exactly at the end
_MAX_RESCORE = 1000


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class BruteForceSolver(SubsetSolver):
    """Exact by enumeration (module docstring). Refuses n > ``max_size`` or C(n, k) > ``max_supports``.

    Parameters
    ----------
    max_size : the largest n accepted, an integer in [1, 40] (default 24).
    max_supports : the most supports enumerated, an integer >= 1 (default 2,000,000).
    """

    name = "brute_force"
    capabilities = Capabilities(
        exact=True,
        reports_bound=True,
        max_size=24,
        warm_start=True,
        patterns=True,
        description="Enumerate all C(n, k) supports (exact; tiny blocks only, the test oracle; honours N:M).",
    )

    def __init__(self, max_size: int = 24, max_supports: int = 2_000_000) -> None:
        if not _is_int(max_size) or not 1 <= max_size <= 40:
            raise invalid_option("max_size", "BruteForceSolver()", "an integer in [1, 40]", repr(max_size))
        if not _is_int(max_supports) or max_supports < 1:
            raise invalid_option("max_supports", "BruteForceSolver()", "an integer >= 1", repr(max_supports))
        self.max_size = int(max_size)
        self.max_supports = int(max_supports)
        self.capabilities = Capabilities(
            exact=True,
            reports_bound=True,
            max_size=self.max_size,
            warm_start=True,
            patterns=True,
            description=type(self).capabilities.description,
        )

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Enumerate; ``warm_start`` is the incumbent returned if the time limit stops the enumeration."""
        start = time.perf_counter()
        n, k = problem.n, problem.n_keep
        if n > self.max_size:
            raise invalid_option(
                "problem", "BruteForceSolver.solve()", f"a block of at most max_size = {self.max_size} weights",
                f"n = {n}",
            )
        pattern = problem.pattern
        count = math.comb(n, k) if pattern is None else math.comb(pattern[1], pattern[0]) ** (n // pattern[1])
        if count > self.max_supports:
            raise invalid_option(
                "problem",
                "BruteForceSolver.solve()",
                f"a block with at most max_supports = {self.max_supports:,} supports C(n, k) to enumerate",
                f"C({n}, {k}) = {count:,}; use branch_and_bound or a MIQP backend instead",
            )
        deadline = None if options.time_limit is None else start + options.time_limit
        H = hessian_matrix(problem)
        w = problem.weights
        g = problem.gradient if problem.gradient is not None else np.zeros(n)
        pruned_side = (n - k) <= k
        m = n - k if pruned_side else k
        if pruned_side:
            H_inv = hessian_inverse(problem)
            u = w - H_inv @ g
            base = -0.5 * float(g @ H_inv @ g)
        else:
            Hw = H @ w
            base = 0.5 * float(w @ Hw) - float(g @ w)
        # rounding band of the batched scores: relative to the size of the terms that were subtracted
        scale = abs(base) + 0.5 * float(w @ H @ w) + float(np.abs(g) @ np.abs(w)) + 1e-300
        band = 1e-9 * scale

        combos = side_combinations(n, m, pattern, pruned_side)
        best_scores: list[np.ndarray] = []
        best_sets: list[np.ndarray] = []
        running_min = math.inf
        enumerated, timed_out = 0, False
        while True:
            rows = list(itertools.islice(combos, _BATCH))
            if not rows:
                break
            chunk = np.array(rows, dtype=np.intp).reshape(len(rows), m)
            enumerated += chunk.shape[0]
            if m == 0:
                scores = np.full(1, base)
            elif pruned_side:
                A = H_inv[chunk[:, :, None], chunk[:, None, :]]  # (B, m, m) = (H⁻¹)_PP
                uP = u[chunk]
                scores = base + 0.5 * np.einsum("bi,bi->b", uP, np.linalg.solve(A, uP[..., None])[..., 0])
            else:
                A = H[chunk[:, :, None], chunk[:, None, :]]  # (B, m, m) = H_SS
                wS, gS, HwS = w[chunk], g[chunk], Hw[chunk]
                AwS = np.einsum("bij,bj->bi", A, wS)
                bS = gS - HwS + AwS
                wPHwP = float(w @ Hw) - 2.0 * np.einsum("bi,bi->b", wS, HwS) + np.einsum("bi,bi->b", wS, AwS)
                sol = np.linalg.solve(A, bS[..., None])[..., 0]
                scores = 0.5 * wPHwP - (float(g @ w) - np.einsum("bi,bi->b", gS, wS)) - 0.5 * np.einsum(
                    "bi,bi->b", bS, sol
                )
            running_min = min(running_min, float(scores.min()))
            keep = scores <= running_min + band
            best_scores.append(scores[keep])
            best_sets.append(chunk[keep])
            # prune the candidate pool as the running minimum improves
            pool_scores = np.concatenate(best_scores)
            pool_sets = np.concatenate(best_sets)
            sel = pool_scores <= running_min + band
            best_scores, best_sets = [pool_scores[sel]], [pool_sets[sel]]
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = enumerated < count
                break

        pool_scores, pool_sets = best_scores[0], best_sets[0]
        order = np.argsort(pool_scores, kind="stable")[:_MAX_RESCORE]
        candidates = []
        for j in sorted(order):  # enumeration order: lexicographic on the side's indices
            mask = np.zeros(n, dtype=bool)
            mask[pool_sets[j]] = True
            candidates.append(~mask if pruned_side else mask)
        if warm_start is not None and timed_out:
            candidates.append(as_support(problem, warm_start))
        # exact re-score; only the best solve is kept (ties: the smallest kept indices, lexicographically)
        best: tuple[float, tuple[int, ...], np.ndarray, SupportSolution] | None = None
        for support in candidates:
            cand = optimal_update(problem, support)
            if best is None or (cand.objective, _kept_key(support)) < (best[0], best[1]):
                best = (cand.objective, _kept_key(support), support, cand)
        _, _, best_support, sol = best
        if options.memo is not None:  # the engine's re-score and update of this support reuse the solve
            options.memo.put(problem, best_support, sol)
        wall = time.perf_counter() - start
        if timed_out:
            return SolveResult(
                support=best_support.copy(), objective=sol.objective, weights=sol.weights, bound=None,
                status=Status.FEASIBLE, termination=Termination.TIME_LIMIT, wall_time=wall,
                iterations=enumerated, solver=self.name,
                extra={"enumerated": enumerated, "total": count, "side": "pruned" if pruned_side else "kept"},
            )
        return SolveResult(
            support=best_support.copy(),
            objective=sol.objective,
            weights=sol.weights,
            bound=sol.objective,
            gap=0.0,
            status=Status.OPTIMAL,
            termination=Termination.OPTIMAL,
            wall_time=wall,
            iterations=enumerated,
            solver=self.name,
            extra={"enumerated": enumerated, "total": count, "side": "pruned" if pruned_side else "kept",
                   "rescored": len(candidates)},
        )


def side_combinations(n: int, m: int, pattern: tuple[int, int] | None, pruned_side: bool):
    """Every index set of size m of the enumerated side (kept or pruned), in lexicographic order; under an
    N:M pattern only the sets that keep N of every group of M (each group contributes N kept or M − N
    pruned indices)."""
    if pattern is None:
        return itertools.combinations(range(n), m)
    N, M = pattern
    per_group = M - N if pruned_side else N
    groups = [list(itertools.combinations(range(g * M, g * M + M), per_group)) for g in range(n // M)]
    return (tuple(i for part in choice for i in part) for choice in itertools.product(*groups))


def _kept_key(support: np.ndarray) -> tuple[int, ...]:
    """Lexicographic key of the kept indices (deterministic tie-break)."""
    return tuple(np.flatnonzero(support).tolist())
