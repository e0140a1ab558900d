"""Swap local search on the true objective E(S) (the loss *after* the CBS-U update), kept exact by
low-rank updates.

CBS-S (``local_search.py``) swaps weights by the loss *without* compensation and leaves the update for
later; on real blocks its support can be far from the best one for E(S) (35 % above the proven optimum
on an MLPNet row). This solver searches the supports by E itself.

**State** (S the kept set, |S| = k, slots j = 0..k−1 holding indices S_j; X (N, n), λ, w, g):

    A  = H_SS⁻¹ = (X_SᵀX_S + λI)⁻¹           (k, k) float64, kept explicitly
    v_S = A (X_Sᵀ y + λ w_S − g_S)             the optimal update on S,  y = X w
    r  = X_S v_S − y                            (N,) the residual, E(S) = ½‖r‖² + (λ/2)‖v − w‖² + gᵀ(v − w)

**Exact swap value.** For a pruned p, the gradient of q at v is u_p = X_pᵀ r − λ w_p + g_p. Adding p
(b = H_Sp = X_Sᵀ X_p, t = A b, Schur complement s = H_pp − bᵀt ≥ λ) lowers E by u_p²/(2s) and moves
v_S by t u_p/s, v_p = −u_p/s; the inverse on S ∪ {p} gets [A]_qq + t_q²/s on its diagonal. Removing q
then costs v'_q² / (2 [A']_qq) (the OBS formula, valid with a linear term since the gradient vanishes on
S ∪ {p}). So for every q ∈ S at once, in O(k) after the O(Nk + k²) vector t:

    ΔE(p, q) = −u_p²/(2s) + (v_q + t_q u_p/s)² / (2 (A_qq + t_q²/s)).

An accepted swap updates A by two rank-one steps (add p, remove q: O(k²)), v_S by the same formulas, and
nothing of size N (module :class:`_State`); A and v_S are recomputed from scratch every ``refactor_every`` swaps so that
rounding does not drift.

**Search.** Each round computes u = Xᵀr − λw + g once (one pass over X, in X's dtype: it only ranks),
takes the ``candidates`` pruned weights with the largest u_p²/(‖X_p‖² + λ) (the gain of adding p alone,
with the diagonal in place of the Schur complement), and for each of them in turn (with the current,
exact u_p) makes the best swap if it lowers E by more than ``tol``·|E|. The search stops when a round
makes no swap (``LOCAL_OPTIMUM``: no improving swap among the candidates; not a proof over all k(n−k)
pairs), after ``max_rounds`` rounds or at the time limit.

**N:M patterns.** A swap replaces a kept weight by a pruned one of the same group of M, so a pattern support
stays one; the start solvers honour the pattern.

**Start.** The best (lowest E) of the ``warm_start`` support and the supports of the ``start`` solvers
(default magnitude), so it never returns worse than its start. Memory: A is k×k and X_S N×k in float64;
blocks with k > ``max_keep`` are returned at the start with a warning (use chunks, or ``iht``).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from scipy.linalg import blas

from formulations.objective import optimal_update
from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..progress import get_logger
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, spd_inverse

__all__ = ["SwapSolver"]

log = get_logger(__name__)


class SwapSolver(SubsetSolver):
    """Update-aware swap local search on E(S) (see the module docstring)."""

    name = "swap"
    capabilities = Capabilities(
        exact=False, reports_bound=False, warm_start=True, patterns=True,
        description="swap local search on the true E(S) (loss after the update), exact low-rank updates; N:M: "
        "swaps inside a group",
    )

    def __init__(self, start: str | list[str] | tuple[str, ...] = ("magnitude",), candidates: int = 64,
                 max_rounds: int = 1000, tol: float = 1e-10, refactor_every: int = 200, max_keep: int = 8000) -> None:
        where = "SwapSolver()"
        starts = (start,) if isinstance(start, str) else tuple(start)
        if not starts or not all(isinstance(s, str) and s != self.name for s in starts):
            raise invalid_option("start", where, "a solver name or a list of names (not 'swap')", repr(start))
        for label, value, low in (("candidates", candidates, 1), ("max_rounds", max_rounds, 1),
                                  ("refactor_every", refactor_every, 1), ("max_keep", max_keep, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise invalid_option(label, where, f"an integer >= {low}", repr(value))
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (np.isfinite(tol) and tol >= 0):
            raise invalid_option("tol", where, "a finite number >= 0", repr(tol))
        self.start, self.candidates, self.max_rounds = starts, int(candidates), int(max_rounds)
        self.tol, self.refactor_every, self.max_keep = float(tol), int(refactor_every), int(max_keep)

    # ------------------------------------------------------------------ start
    def _start(self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None) -> tuple[np.ndarray, str]:
        from .registry import get_solver  # the registry imports this module lazily

        best: tuple[float, np.ndarray, str] | None = None
        tried = [("warm_start", warm_start)] if warm_start is not None else []
        for name in self.start:
            sub = get_solver(name)
            sub_options = SolveOptions(seed=options.seed, certify=False, evaluate=options.evaluate,
                                       time_limit=options.time_limit, memo=options.memo)
            tried.append((name, sub.solve(problem, sub_options).support))
        if len(tried) == 1:  # nothing to compare: scoring the one start would be a wasted O(N²k) solve
            return np.asarray(tried[0][1], dtype=bool).copy(), tried[0][0]
        for name, support in tried:
            value = optimal_update(problem, support, options.memo).objective
            if best is None or value < best[0]:
                best = (value, np.asarray(support, dtype=bool).copy(), name)
        return best[1], best[2]  # type: ignore[index]

    # ------------------------------------------------------------------ solve
    def solve(self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None) -> SolveResult:
        began = time.perf_counter()
        deadline = None if options.time_limit is None else began + options.time_limit
        support, origin = self._start(problem, options, warm_start)
        n, k = problem.n, problem.n_keep
        extra = {"start": origin, "swaps": 0, "rounds": 0}
        if k == 0 or k == n:
            return SolveResult(support=support, termination=Termination.COMPLETED, solver=self.name,
                               wall_time=time.perf_counter() - began, extra=extra)
        if k > self.max_keep:
            # one fixed message (Python shows it once per place), the numbers go to the record
            warnings.warn(
                "swap: a block keeps more than max_keep weights (its k×k inverse would be too large), so its start "
                "is returned without swaps. Use smaller blocks or raise max_keep.",
                stacklevel=2,
            )
            log.info("swap: block '%s' keeps k = %d > max_keep = %d; returning the start (%s)", problem.label, k,
                     self.max_keep, origin)
            extra["skipped"] = "k above max_keep"
            return SolveResult(support=support, termination=Termination.COMPLETED, solver=self.name,
                               wall_time=time.perf_counter() - began, extra=extra)

        X = problem.factor_matrix()
        w, lam = problem.weights, problem.damping
        g = problem.gradient if problem.gradient is not None else np.zeros(n)
        y = problem.target()
        col_norm2 = problem.fisher_diagonal()
        state = _State(X, w, lam, g, y, np.flatnonzero(support))
        state.group = None if problem.pattern is None else problem.pattern[1]  # N:M: swaps stay inside a group
        e_start = state.objective()
        termination = Termination.ITERATION_LIMIT
        swaps_since = 0
        for _ in range(self.max_rounds):
            extra["rounds"] += 1
            r = state.residual()
            u = np.asarray(X.T @ r.astype(X.dtype, copy=False), dtype=np.float64) - lam * w + g
            proxy = u * u / (col_norm2 + lam)
            proxy[state.idx] = -np.inf
            m = min(self.candidates, n - k)
            cands = np.argpartition(-proxy, m - 1)[:m]
            cands = cands[np.argsort(-proxy[cands], kind="stable")]
            made = 0
            threshold = self.tol * max(abs(state.objective()), 1e-300)
            state.prepare(cands)
            for i in range(cands.size):
                if deadline is not None and time.perf_counter() > deadline:
                    break
                if state.try_candidate(i, threshold):
                    made += 1
                    swaps_since += 1
                    if swaps_since >= self.refactor_every:
                        state.refactor()
                        swaps_since = 0
            extra["swaps"] += made
            if deadline is not None and time.perf_counter() > deadline:
                termination = Termination.TIME_LIMIT
                break
            if made == 0:
                termination = Termination.LOCAL_OPTIMUM
                break
        support = np.zeros(n, dtype=bool)
        support[state.idx] = True
        extra["start_objective"] = float(e_start)
        return SolveResult(support=support, status=Status.FEASIBLE, termination=termination, solver=self.name,
                           iterations=int(extra["swaps"]), wall_time=time.perf_counter() - began, extra=extra)


class _State:
    """The support's slots, A = H_SS⁻¹, v_S, with exact swap evaluation (module docstring).

    Per round, :meth:`prepare` gathers the candidates' columns X_C (N, m) and B = X_SᵀX_C (k, m) in one
    matrix product, so evaluating a candidate costs O(k²) (t = A b) and an accepted swap O(k² + Nm)
    (two in-place rank-one updates of A and one new row of B). u_p = X_pᵀr − λw_p + g_p is computed as
    bᵀv_S − X_pᵀy − λw_p + g_p, so r itself is only formed once per round."""

    def __init__(self, X: np.ndarray, w: np.ndarray, lam: float, g: np.ndarray, y: np.ndarray, idx: np.ndarray) -> None:
        self.X, self.w, self.lam, self.g, self.y = X, w, lam, g, y
        self.idx = idx.astype(np.intp).copy()
        self.XS = np.asarray(X[:, self.idx], dtype=np.float64, order="F")
        self.cands = np.zeros(0, dtype=np.intp)
        self.group: int | None = None
        self.refactor()

    def refactor(self) -> None:
        """A and v_S from scratch (Cholesky of X_SᵀX_S + λI); B of the current candidates too."""
        XS, lam, idx = self.XS, self.lam, self.idx
        M = XS.T @ XS
        M[np.diag_indices_from(M)] += lam
        self.A = np.ascontiguousarray(spd_inverse(M))
        rhs = XS.T @ self.y + lam * self.w[idx] - self.g[idx]
        self.v = self.A @ rhs
        if self.cands.size:
            self.B = XS.T @ self.XC

    def residual(self) -> np.ndarray:
        """r = X_S v_S − y (N,)."""
        return self.XS @ self.v - self.y

    def prepare(self, cands: np.ndarray) -> None:
        """Gather the round's candidate columns and their products with X_S."""
        self.cands = np.asarray(cands, dtype=np.intp)
        self.XC = np.asarray(self.X[:, self.cands], dtype=np.float64, order="F")
        self.B = self.XS.T @ self.XC
        self.yc = self.XC.T @ self.y
        self.nc = np.einsum("ij,ij->j", self.XC, self.XC)
        self.used = np.zeros(self.cands.size, dtype=bool)

    def objective(self) -> float:
        """E(S) = ½‖r‖² + (λ/2)‖v − w‖² + gᵀ(v − w), v zero off S."""
        r = self.residual()
        d_kept = self.v - self.w[self.idx]
        mask = np.ones(self.w.size, dtype=bool)
        mask[self.idx] = False
        w_pruned = self.w[mask]
        sq = float(d_kept @ d_kept) + float(w_pruned @ w_pruned)
        lin = float(self.g[self.idx] @ d_kept) - float(self.g[mask] @ w_pruned)
        return 0.5 * float(r @ r) + 0.5 * self.lam * sq + lin

    def try_candidate(self, i: int, threshold: float) -> bool:
        """Make the best swap (candidate i in, some q out) if it lowers E by more than ``threshold``."""
        if self.used[i]:
            return False
        p = int(self.cands[i])
        b = self.B[:, i]
        up = float(b @ self.v) - self.yc[i] - self.lam * self.w[p] + self.g[p]
        t = self.A @ b
        s = self.nc[i] + self.lam - float(b @ t)
        if not s > 0.5 * self.lam:  # s ≥ λ in exact arithmetic; less means A has drifted
            self.refactor()
            b = self.B[:, i]
            up = float(b @ self.v) - self.yc[i] - self.lam * self.w[p] + self.g[p]
            t = self.A @ b
            s = max(self.nc[i] + self.lam - float(b @ t), self.lam)
        v1 = self.v + t * (up / s)
        a_diag = np.diag(self.A) + t * t / s
        delta = -up * up / (2 * s) + v1 * v1 / (2 * a_diag)
        if self.group is not None:  # under N:M only a kept weight of p's own group may leave
            delta = np.where(self.idx // self.group == p // self.group, delta, np.inf)
        j = int(np.argmin(delta))
        if not delta[j] < -threshold:
            return False
        # A on S ∪ {p} = [[A + ttᵀ/s, c], [cᵀ, 1/s]] with c = −t/s; then remove slot j and put p there.
        # A is C-contiguous and symmetric, so its transpose is the Fortran array BLAS updates in place.
        c = -t / s
        blas.dger(1.0 / s, t, t, a=self.A.T, overwrite_a=1)
        a = self.A[:, j].copy()
        ajj = a[j]
        cj = c[j]
        cp = c - a * (cj / ajj)
        cpp = 1.0 / s - cj * cj / ajj
        blas.dger(-1.0 / ajj, a, a, a=self.A.T, overwrite_a=1)
        self.A[:, j] = cp
        self.A[j, :] = cp
        self.A[j, j] = cpp
        vp = -up / s
        vj = v1[j]
        self.v = v1 - a * (vj / ajj)
        self.v[j] = vp - cj * vj / ajj
        xp = self.XC[:, i]
        self.idx[j] = p
        self.XS[:, j] = xp
        self.B[j, :] = self.XC.T @ xp
        self.used[i] = True
        return True
