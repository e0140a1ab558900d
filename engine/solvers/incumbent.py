"""The incumbent side of the exact solvers: E(S) for many supports from dense H (:class:`DenseEvaluator`),
best-improvement swap local search on it, and the heuristic start (:func:`heuristic_incumbent`) that
``bnb`` and the MIQP backends (HiGHS, pyomo, cvxpy) polish and prove."""

from __future__ import annotations

import math
import time

import numpy as np

from formulations.problem import BlockProblem

from .base import select_top, spd_inverse

__all__ = ["DenseEvaluator", "swap_local_search", "heuristic_incumbent"]


# ----------------------------------------------------------------------------------- exact E(S), batched
class DenseEvaluator:
    """E(S) for many supports of one block from dense H (n×n) and H⁻¹, float64.

    Pruned side (|P| ≤ |S|): with G = H⁻¹ and u = w − Gg, E(S) = −½ gᵀGg + ½ u_Pᵀ (G_PP)⁻¹ u_P.
    Kept side: E(S) = ½ w_PᵀH_PP w_P − g_Pᵀw_P − ½ b_Sᵀ H_SS⁻¹ b_S with b_S = g_S − H_SP w_P, where
    w_PᵀH_PPw_P = wᵀHw − 2 w_Sᵀ(Hw)_S + w_SᵀH_SS w_S. Both are exact for any g; the side with the
    smaller m = min(k, n − k) is used (batched m×m solves).
    """

    def __init__(self, problem: BlockProblem, hessian: np.ndarray | None = None) -> None:
        self.n, self.k, self.pattern = problem.n, problem.n_keep, problem.pattern
        self.H = problem.dense_hessian() if hessian is None else hessian
        self.w = problem.weights
        self.g = problem.gradient if problem.gradient is not None else np.zeros(self.n)
        self.pruned_side = (self.n - self.k) <= self.k
        if self.pruned_side:
            self.G = spd_inverse(self.H)  # symmetric by construction
            Gg = self.G @ self.g
            self.u = self.w - Gg
            self.base = -0.5 * float(self.g @ Gg)
        else:
            self.Hw = self.H @ self.w
            self.wHw = float(self.w @ self.Hw)
            self.gw = float(self.g @ self.w)

    def side_sets(self, supports: np.ndarray) -> np.ndarray:
        """(B, m) sorted indices of the evaluated side (pruned or kept) of each support (B, n) bool."""
        side = ~supports if self.pruned_side else supports
        m = self.n - self.k if self.pruned_side else self.k
        return np.nonzero(side)[1].reshape(side.shape[0], m)

    def values(self, supports: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """E(S) for each row of ``supports`` (B, n) bool; shape (B,)."""
        supports = np.atleast_2d(np.asarray(supports, dtype=bool))
        out = np.empty(supports.shape[0])
        for s0 in range(0, supports.shape[0], chunk):
            out[s0 : s0 + chunk] = self._values(self.side_sets(supports[s0 : s0 + chunk]))
        return out

    def _values(self, idx: np.ndarray) -> np.ndarray:
        B, m = idx.shape
        if m == 0:
            if self.pruned_side:
                return np.full(B, self.base)
            return np.full(B, 0.5 * self.wHw - self.gw)
        if self.pruned_side:
            A = self.G[idx[:, :, None], idx[:, None, :]]
            uP = self.u[idx]
            sol = np.linalg.solve(A, uP[..., None])[..., 0]
            return self.base + 0.5 * np.einsum("bi,bi->b", uP, sol)
        A = self.H[idx[:, :, None], idx[:, None, :]]
        wS, gS, HwS = self.w[idx], self.g[idx], self.Hw[idx]
        AwS = np.einsum("bij,bj->bi", A, wS)
        bS = gS - HwS + AwS
        wPHwP = self.wHw - 2.0 * np.einsum("bi,bi->b", wS, HwS) + np.einsum("bi,bi->b", wS, AwS)
        sol = np.linalg.solve(A, bS[..., None])[..., 0]
        gPwP = self.gw - np.einsum("bi,bi->b", gS, wS)
        return 0.5 * wPHwP - gPwP - 0.5 * np.einsum("bi,bi->b", bS, sol)


def swap_local_search(
    evaluator: DenseEvaluator, support: np.ndarray, deadline: float | None = None, max_passes: int = 1000,
    pattern: tuple[int, int] | None = None,
) -> tuple[np.ndarray, float, int]:
    """Best-improvement single-swap local search on the exact E(S).

    Each pass scores all k(n − k) swaps (one kept weight out, one pruned weight in), in batches of at most
    ~2²² matrix entries (m×m each, m = min(k, n − k)), and takes the best if it lowers E by more than
    rounding (1e-12 relative). The ``deadline`` is checked between batches too (one pass at n = 200 takes
    seconds): past it, the best swap scored so far is made if it improves, and the search stops. Under an
    N:M ``pattern`` only swaps within a group are scored (they keep the pattern). Returns (support, E, passes).
    """
    S = np.asarray(support, dtype=bool).copy()
    value = float(evaluator.values(S[None, :])[0])
    passes = 0
    kept, pruned = np.flatnonzero(S), np.flatnonzero(~S)
    if kept.size == 0 or pruned.size == 0:
        return S, value, 0
    m = min(kept.size, pruned.size)
    batch = max(1, min(4096, 2**22 // (m * m)))
    late = False
    while passes < max_passes and not late:
        if deadline is not None and time.perf_counter() > deadline:
            break
        passes += 1
        kept, pruned = np.flatnonzero(S), np.flatnonzero(~S)
        ii, jj = np.meshgrid(kept, pruned, indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        if pattern is not None:
            same = ii // pattern[1] == jj // pattern[1]
            ii, jj = ii[same], jj[same]
        best_val, best = math.inf, None
        for b0 in range(0, ii.size, batch):
            if b0 and deadline is not None and time.perf_counter() > deadline:
                late = True
                break
            rows = np.arange(min(batch, ii.size - b0))
            cand = np.repeat(S[None, :], rows.size, axis=0)
            cand[rows, ii[b0 : b0 + rows.size]] = False
            cand[rows, jj[b0 : b0 + rows.size]] = True
            vals = evaluator.values(cand)
            b = int(np.argmin(vals))
            if vals[b] < best_val:  # strict: the first of equal values, as one argmin over the pass
                best_val, best = float(vals[b]), cand[b].copy()
        if best is not None and best_val < value - 1e-12 * max(1.0, abs(value)):
            S, value = best, best_val
        else:
            break
    return S, value, passes


def heuristic_incumbent(
    problem: BlockProblem,
    evaluator: DenseEvaluator,
    warm_start: np.ndarray | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, float, dict]:
    """Best of warm start / magnitude / WoodFisher / greedy OBS (per group and without greedy on an N:M
    block), then swap local search. Returns
    (support, E, info) with info = {"start_values": {...}, "start": name, "swap_passes": int}."""
    candidates: dict[str, np.ndarray] = {}
    if warm_start is not None:
        candidates["warm_start"] = np.asarray(warm_start, dtype=bool)
    candidates["magnitude"] = select_top(problem, np.abs(problem.weights))
    if evaluator.pruned_side:
        diag_inv = np.diag(evaluator.G)
    else:
        diag_inv = np.diag(np.linalg.inv(evaluator.H))
    candidates["woodfisher"] = select_top(problem, problem.weights**2 / np.maximum(diag_inv, 1e-300))
    if problem.pattern is None:  # greedy elimination ignores groups
        try:
            from .greedy import obs_elimination  # another module of this package; optional for robustness

            path = obs_elimination(problem, deadline=deadline)
            s = np.ones(problem.n, dtype=bool)
            s[path.removed] = False
            candidates["greedy"] = s
        except Exception:  # noqa: BLE001 - the greedy start is an optimisation, never a requirement
            pass
    names = list(candidates)
    vals = evaluator.values(np.stack([candidates[c] for c in names]))
    start_values = {nm: float(v) for nm, v in zip(names, vals)}
    order = np.argsort(vals, kind="stable")
    best_name = names[int(order[0])]
    S, value, passes = swap_local_search(evaluator, candidates[best_name], deadline, pattern=problem.pattern)
    info = {"start_values": start_values, "start": best_name, "swap_passes": passes}
    if warm_start is not None and start_values["warm_start"] <= value:
        # never worse than the warm start, to the last bit
        S, value = candidates["warm_start"].copy(), start_values["warm_start"]
    return S, value, info
