"""Iterative hard thresholding (IHT) on the least-squares form of the block problem (CHITA-style).

Problem (d = v − w, y = Xw, X of shape (N, n), float32 or float64):

    min_v  q(v) = ½‖X d‖² + (λ/2)‖d‖² + gᵀd     s.t.  ‖v‖₀ ≤ k,
    ∇q(v) = Xᵀ(X d) + λ d + g.

**Iteration.** v ← H_k(v − η ∇q(v)), where H_k keeps the k largest |·| (ties: lower index) and zeroes the
rest. With η = 1/L and L ≥ λ_max(H) = ‖X‖₂² + λ, q is majorised by its quadratic upper bound and each
step cannot increase q (Blumensath & Davies 2009). L is estimated by power iteration on XᵀX (Rayleigh
quotients approach ‖X‖₂² from below, so the estimate is inflated by 5 %, and whenever a 1/L step fails to
decrease q, L is doubled: the monotone guarantee is kept without trusting the estimate).

**Line search** (``line_search``, as in CHITA, Benbaki et al. 2023): each iteration first tries η = 2η_prev
(at most 2²⁰/L) and halves it until q does not increase (a step longer than 1/L must decrease q by more
than rounding), never below 1/L. Long steps cross between supports faster than 1/L steps, which are
very short when H is ill-conditioned.

**Active set** (``active_set``): when the support has not changed for ``patience`` iterations, the exact
update on that support (``formulations.objective.optimal_update``, the CBS-U update) replaces v.

**Escaping an exact point.** At an exact update (the start, and after every polish) ∇q vanishes on S, so
a 1/L step returns v itself whenever the support is "L-stationary": plain IHT stops there. With
``line_search`` the solver then looks along the whole ray: the supports S_j = supp H_k(v − 2^j ∇q/L),
j = 1..20, cost no product with X to compute; the distinct ones are tried in order of growing step
(fewest swaps first). A candidate is accepted when q at the thresholded point is lower than E(S), or, with
``refine`` > 0, when q is lower after ``refine`` conjugate-gradient steps on the candidate support (a
matrix-free, inexact version of the exact update, i.e. Hard Thresholding Pursuit; Foucart 2011): a
thresholded point without compensation usually loses to the old support even when the new support is
better. No accepted candidate: the exact point is a local optimum and the solver stops.

**Stopping.** LOCAL_OPTIMUM: as above, or (without line search) the support is stable and the step
negligible: ‖v_new − v‖ ≤ tol·max(1, ‖v‖), or q fell by no more than rounding; ITERATION_LIMIT after
``max_iter`` iterations; TIME_LIMIT at ``options.time_limit``. The answer is the best support seen by E(S)
(the start, every polished support, the last one), so it is never worse than the start's optimal update.

Only X @ d and Xᵀ @ r are used (matrix-free; a float32 X stays float32 in the products), so the method
runs at n = 32,360 with N = 10,000. ``extra["products"]`` counts them (the power iteration aside). The
exact solves go through ``optimal_update`` (an N×N or k×k Cholesky), once per stable support.
"""

from __future__ import annotations

import time

import numpy as np

from formulations.objective import optimal_update
from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, select_top

__all__ = ["IHTSolver", "lipschitz_constant"]

#: inflation of the power-iteration estimate of ‖X‖₂² (it converges from below)
_SAFETY = 1.05
#: longest step tried, as a power of two in units of 1/L
_MAX_DOUBLINGS = 20


class _Factor:
    """Matrix-free products with the factor X (N, n); float32 X is multiplied in float32 (no float64 copy).

    ``count`` is the number of products taken (each one pass over X)."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X
        self.dtype = X.dtype
        self.count = 0

    def matvec(self, d: np.ndarray) -> np.ndarray:
        """X d, (N,) float64."""
        self.count += 1
        return np.asarray(self.X @ d.astype(self.dtype, copy=False), dtype=np.float64)

    def rmatvec(self, r: np.ndarray) -> np.ndarray:
        """Xᵀ r, (n,) float64."""
        self.count += 1
        return np.asarray(self.X.T @ r.astype(self.dtype, copy=False), dtype=np.float64)


def lipschitz_constant(problem: BlockProblem, iterations: int = 30, seed: int = 0, rtol: float = 1e-5) -> float:
    """Estimate L = ‖X‖₂² + λ (= λ_max(H)) by power iteration on XᵀX, inflated by 5 % (module docstring).

    Starts from a seeded Gaussian vector; stops when the Rayleigh quotient changes by less than ``rtol``
    (relative) or after ``iterations`` products with XᵀX.
    """
    op = _Factor(problem.factor_matrix())
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(problem.n)
    u /= np.linalg.norm(u)
    estimate = 0.0
    for _ in range(iterations):
        z = op.rmatvec(op.matvec(u))
        new = float(u @ z)  # Rayleigh quotient uᵀXᵀXu, ‖u‖ = 1
        norm = float(np.linalg.norm(z))
        if norm == 0.0:
            break
        u = z / norm
        if abs(new - estimate) <= rtol * max(new, 1e-300):
            estimate = new
            break
        estimate = new
    return _SAFETY * max(estimate, 0.0) + problem.damping


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class _Model:
    """q, ∇q and restricted conjugate gradient for one problem (float64 vectors, matrix-free in X)."""

    def __init__(self, problem: BlockProblem) -> None:
        self.w = problem.weights
        self.lam = problem.damping
        self.g = problem.gradient
        self.op = _Factor(problem.factor_matrix())

    def value(self, d: np.ndarray, r: np.ndarray) -> float:
        """q from d = v − w and r = X d."""
        q = 0.5 * float(r @ r) + 0.5 * self.lam * float(d @ d)
        return q + float(self.g @ d) if self.g is not None else q

    def gradient(self, d: np.ndarray, r: np.ndarray) -> np.ndarray:
        """∇q = Xᵀr + λd + g, (n,)."""
        grad = self.op.rmatvec(r) + self.lam * d
        return grad + self.g if self.g is not None else grad

    def refine(self, v: np.ndarray, S: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``iterations`` CG steps on min q(u) s.t. u_P = 0, from v (supported on S).

        Returns (u, r = X(u − w), q(u)). CG on H_SS (SPD, since λ > 0) decreases q monotonically.
        """
        u = v.copy()
        d = u - self.w
        r = self.op.matvec(d)
        res = -self.gradient(d, r) * S
        p = res.copy()
        rs = float(res @ res)
        rs0 = rs
        for _ in range(iterations):
            if rs <= 1e-30 * max(rs0, 1e-300):
                break
            Xp = self.op.matvec(p)
            Hp = (self.op.rmatvec(Xp) + self.lam * p) * S
            pHp = float(p @ Hp)
            if pHp <= 0.0:
                break
            a = rs / pHp
            u += a * p
            d += a * p
            r += a * Xp
            res -= a * Hp
            rs_new = float(res @ res)
            p = res + (rs_new / rs) * p
            rs = rs_new
        return u, r, self.value(d, r)


class IHTSolver(SubsetSolver):
    """Iterative hard thresholding with line search, active-set polishing and escapes (module docstring).

    Parameters
    ----------
    max_iter : iterations (integer ≥ 1).
    tol : relative change ‖v_new − v‖/max(1, ‖v‖) below which a stable support counts as converged (≥ 0).
    active_set : polish with the exact update once the support is stable.
    line_search : try steps longer than 1/L (backtracking on q), and search the ray at exact points.
    patience : iterations with an unchanged support before it counts as stable (integer ≥ 1).
    refine : conjugate-gradient steps used to judge a candidate support at an exact point (integer ≥ 0;
        0 = judge the thresholded point alone, plain CHITA IHT).
    """

    name = "iht"
    capabilities = Capabilities(
        warm_start=True, patterns=True,
        description="Iterative hard thresholding (CHITA-style, matrix-free) with line search and exact polishing; "
        "N:M: the projection keeps N per group.",
    )

    def __init__(
        self,
        max_iter: int = 500,
        tol: float = 1e-8,
        active_set: bool = True,
        line_search: bool = True,
        patience: int = 3,
        refine: int = 10,
    ) -> None:
        where = "IHTSolver()"
        if not _is_int(max_iter) or max_iter < 1:
            raise invalid_option("max_iter", where, "an integer >= 1", repr(max_iter))
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (np.isfinite(tol) and tol >= 0):
            raise invalid_option("tol", where, "a finite number >= 0", repr(tol))
        if not isinstance(active_set, (bool, np.bool_)):
            raise invalid_option("active_set", where, "True or False", repr(active_set))
        if not isinstance(line_search, (bool, np.bool_)):
            raise invalid_option("line_search", where, "True or False", repr(line_search))
        if not _is_int(patience) or patience < 1:
            raise invalid_option("patience", where, "an integer >= 1", repr(patience))
        if not _is_int(refine) or refine < 0:
            raise invalid_option("refine", where, "an integer >= 0", repr(refine))
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.active_set = bool(active_set)
        self.line_search = bool(line_search)
        self.patience = int(patience)
        self.refine = int(refine)

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Run IHT from ``warm_start`` (or the magnitude support); return the best support seen by E(S)."""
        start = time.perf_counter()
        deadline = None if options.time_limit is None else start + options.time_limit
        n, k = problem.n, problem.n_keep
        S = select_top(problem, np.abs(problem.weights)) if warm_start is None else np.asarray(warm_start, bool).copy()
        first = optimal_update(problem, S, options.memo)
        best_objective, best_support, best_weights = first.objective, S.copy(), first.weights
        if k in (0, n):  # a single feasible support
            return SolveResult(
                support=S, objective=best_objective, weights=best_weights, termination=Termination.COMPLETED,
                wall_time=time.perf_counter() - start, solver=self.name,
            )

        w, lam, g = problem.weights, problem.damping, problem.gradient
        model = _Model(problem)
        L = lipschitz_constant(problem, seed=options.seed)
        # q counts as "not increased" up to rounding: float32 products carry ~1e-7 relative error
        rel = 1e-6 if model.op.dtype == np.float32 else 1e-13
        y = model.op.matvec(w)  # not problem.target(): that makes a float64 copy of a float32 X
        q_scale = 0.5 * float(y @ y) + 0.5 * lam * float(w @ w) + (abs(float(g @ w)) if g is not None else 0.0)
        slack = rel * max(q_scale, 1e-300)

        v, r = first.weights, first.residual
        d = v - w
        q_v = first.objective
        exact = True  # v is the exact update on S
        polished = S.copy()
        evaluated = {S.tobytes()}
        n_polish = n_escape = stable = it = 0
        eta = 1.0 / L
        termination = Termination.ITERATION_LIMIT
        for it in range(1, self.max_iter + 1):
            if deadline is not None and time.perf_counter() > deadline:
                termination, it = Termination.TIME_LIMIT, it - 1
                break
            grad = model.gradient(d, r)
            if exact and self.line_search:
                # search the ray for a support that beats E(S) (module docstring: escaping an exact point)
                found = None
                tried: set[bytes] = set()
                for j in range(1, _MAX_DOUBLINGS + 1):
                    if deadline is not None and time.perf_counter() > deadline:
                        break
                    step = 2.0**j / L
                    u = v - step * grad
                    S_new = select_top(problem, np.abs(u))
                    key = S_new.tobytes()
                    if np.array_equal(S_new, S) or key in tried:
                        continue
                    tried.add(key)
                    v_new = np.where(S_new, u, 0.0)
                    d_new = v_new - w
                    r_new = model.op.matvec(d_new)
                    q_new = model.value(d_new, r_new)
                    if q_new > q_v - slack and self.refine:
                        v_new, r_new, q_new = model.refine(v_new, S_new, self.refine)
                        d_new = v_new - w
                    if q_new < q_v - slack:
                        found = (v_new, d_new, r_new, q_new, S_new, step)
                        break
                if found is None:
                    late = deadline is not None and time.perf_counter() > deadline
                    termination = Termination.TIME_LIMIT if late else Termination.LOCAL_OPTIMUM
                    break
                v, d, r, q_v, S, eta = found
                n_escape += 1
                exact, stable = False, 0
                continue
            # ordinary IHT step with backtracking (or the plain 1/L step)
            eta_try = min(2.0 * eta, 2.0**_MAX_DOUBLINGS / L) if self.line_search else 1.0 / L
            accepted = False
            for _ in range(80):  # halvings down to 1/L, then a few doublings of L at most
                u = v - eta_try * grad
                S_new = select_top(problem, np.abs(u))
                v_new = np.where(S_new, u, 0.0)
                d_new = v_new - w
                r_new = model.op.matvec(d_new)
                q_new = model.value(d_new, r_new)
                long_step = eta_try * L > 1.0 + 1e-12
                # a long step must really decrease q (else rounding noise, amplified by η, walks v around a
                # fixed point); the 1/L step is guaranteed not to increase q, so it only has to pass rounding
                if q_new <= q_v - slack if long_step else q_new <= q_v + slack:
                    accepted = True
                    break
                if long_step:
                    eta_try = max(eta_try / 2.0, 1.0 / L)
                else:
                    L *= 2.0  # the power-iteration estimate was too low: restore the majorisation
                    eta_try = 1.0 / L
            if not accepted:  # no decrease even with tiny steps: v is stationary to rounding
                termination = Termination.LOCAL_OPTIMUM
                break
            eta = eta_try
            change = float(np.linalg.norm(v_new - v)) / max(1.0, float(np.linalg.norm(v)))
            same = bool(np.array_equal(S_new, S))
            settled = change <= self.tol or q_v - q_new <= slack
            v, d, r, q_v, S = v_new, d_new, r_new, q_new, S_new
            exact = exact and same and settled
            stable = stable + 1 if same else 0
            if same and (stable >= self.patience or settled):
                if self.active_set and not np.array_equal(S, polished):
                    sol = optimal_update(problem, S, options.memo)
                    n_polish += 1
                    evaluated.add(S.tobytes())
                    polished = S.copy()
                    if sol.objective < best_objective:
                        best_objective, best_support, best_weights = sol.objective, S.copy(), sol.weights
                    v, r, q_v = sol.weights, sol.residual, sol.objective
                    d = v - w
                    exact, stable = True, 0
                    continue
                if settled:
                    termination = Termination.LOCAL_OPTIMUM
                    break
        if S.tobytes() not in evaluated:
            sol = optimal_update(problem, S, options.memo)
            if sol.objective < best_objective:
                best_objective, best_support, best_weights = sol.objective, S.copy(), sol.weights
        return SolveResult(
            support=best_support,
            objective=best_objective,
            weights=best_weights,
            status=Status.FEASIBLE,
            termination=termination,
            wall_time=time.perf_counter() - start,
            iterations=it,
            solver=self.name,
            extra={
                "lipschitz": float(L),
                "polishes": n_polish,
                "escapes": n_escape,
                "products": model.op.count,
                "start_objective": float(first.objective),
                "improved": bool(best_objective < first.objective),
            },
        )
