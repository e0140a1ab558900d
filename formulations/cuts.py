"""Outer approximation in z, the perspective (Boolean) relaxation and dual ascent (DESIGN.md §1).

Everything here is float64 numpy/scipy; shapes are given as (n,) for the block and (m,) for a subproblem.

**The split.** Write H = A + δI with a scalar δ > 0 and A = H − δI ⪰ 0 (so 0 < δ ≤ λ_min(H)). With
d = v − w and ``b`` the linear term (b = g for a block),

    q(v) = bᵀd + ½ dᵀA d + (δ/2) Σ_i (v_i − w_i)².

The DESIGN's split is δ = λ, A = F = XᵀX (the default here for a :class:`BlockProblem`); any
δ ∈ (0, λ_min(H)] is valid, and a larger δ gives a stronger relaxation (moving δ from the quadratic into
the perspective term can only raise its value), so the dense solvers use δ ≈ λ_min(H) of the
subproblem at hand (:func:`perspective_shift`): ~10× λ on the Gaussian benchmark.

**Dual function.** Write A = X̃ᵀX̃ (X̃ never needs forming) and ỹ = X̃w, p = b − δw. For every α and every
z ∈ {0,1}ⁿ (z_i = 1: kept),

    f(z) = E(S(z)) ≥ D(α, z) = −αᵀỹ − ½‖α‖² + c₀ − Σ_i z_i c_i(α),
    c_i(α) = (X̃_iᵀα + p_i)² / (2δ),      c₀ = −bᵀw + (δ/2)‖w‖² (+ the subproblem's constant),

*derivation*: ½‖X̃d‖² = max_α αᵀX̃d − ½‖α‖², then for each kept i, min over v_i of
u_i v_i + (δ/2)(v_i − w_i)² with u_i = X̃_iᵀα + b_i equals (δ/2)w_i² − (u_i − δw_i)²/(2δ), and a pruned i pays
(δ/2)w_i²; min over v and max over α swap (convex–concave, v unconstrained on S). Equality holds at
α = X̃ d*(z), d* = v*(S) − w the optimal update. Only the *step* d enters through
X̃ᵀα = A d and αᵀỹ = (Ad)ᵀw, ‖α‖² = dᵀAd, so here a dual point is represented by d (the DESIGN's
α ∈ R^N is X d when δ = λ):

    u = A d + p,   c = u² / (2δ),   D(d, z) = −(u − p)ᵀw − ½ dᵀ(u − p) + c₀ − zᵀc.

**Cut** (outer approximation of the convex extension of f): at a support S_j with step d_j = d*(S_j),
D(d_j, z_j) = f(z_j), so

    η ≥ f(z_j) − Σ_i c_i(d_j) (z_i − z_{j,i})        for every binary z.

At the optimum, c_i = δ v_i²/2 for kept i (∇q vanishes on S) and c_i = (Hd + b)_i²/(2δ) for pruned i: the
cut says removing i raises f by at least δv_i²/2 and adding i lowers f by at most (Hd+b)_i²/(2δ).

**Boolean (perspective) relaxation.** With fixings (I forced in, O forced out, the rest free with
k' = k − |I| to choose),

    LB(d) = −(u − p)ᵀw − ½ dᵀ(u − p) + c₀ − Σ_{i∈I} c_i − (sum of the k' largest c_i over the free i)

is a lower bound for every d, concave in α = X̃d, and its maximum equals the perspective relaxation

    min_v  ½ (v − w)ᵀA(v − w) + pᵀv + (δ/2) ρ_{k'}(v) + c₀,   ρ_{k'}(v) = min { Σ v_i²/z_i : 0 ≤ z ≤ 1, Σz ≤ k' }

(ρ is the squared k-support norm), which :func:`solve_perspective` solves by accelerated proximal
gradient (FISTA with adaptive restart) on v, with the closed-form prox of ρ (:func:`prox_k_support`),
reading a valid bound LB at every iterate. Fixed-in coordinates are eliminated exactly beforehand by a
Schur complement and fixed-out ones substituted (:func:`restrict`), so a subproblem is again an
instance of the same form on the free coordinates only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .errors import InvalidProblemError
from .ksupport import k_support_squared, prox_k_support, prox_k_support_warm
from .objective import dual_bound, dual_scores, optimal_update
from .problem import BlockProblem

__all__ = [
    "DenseSubproblem",
    "RelaxationResult",
    "Cut",
    "DualAscentResult",
    "dense_subproblem",
    "restrict",
    "subproblem_objective",
    "perspective_shift",
    "prox_k_support",
    "k_support_squared",
    "solve_perspective",
    "dual_terms",
    "dual_value_at_step",
    "lower_bound_at_step",
    "support_cut",
    "cut_value",
    "dual_ascent",
]


# ----------------------------------------------------------------------------------------- subproblems
@dataclass(frozen=True)
class DenseSubproblem:
    """A dense instance of the selection problem on m free coordinates.

        E(S) = min_d { ½ dᵀ H d + bᵀ d : d_i = −w_i for i ∈ F∖S } + constant,   S ⊂ F, |S| = n_keep.

    hessian : (m, m) float64 SPD (H, or a Schur complement of it), linear : (m,) b, weights : (m,) w,
    constant : float, n_keep : k' (kept among the free), index : (m,) int64 original indices.
    A whole block is the instance H = XᵀX + λI, b = g, constant 0 (see :func:`dense_subproblem`).
    """

    hessian: np.ndarray
    weights: np.ndarray
    linear: np.ndarray
    constant: float
    n_keep: int
    index: np.ndarray

    @property
    def size(self) -> int:
        """m, the number of free coordinates."""
        return int(self.weights.size)


def dense_subproblem(problem: BlockProblem, hessian: np.ndarray | None = None) -> DenseSubproblem:
    """The whole block as a :class:`DenseSubproblem` (n×n: small blocks only). ``hessian``: H = F + λI when
    the caller already formed it (n, n); None forms it."""
    n = problem.n
    g = problem.gradient if problem.gradient is not None else np.zeros(n)
    H = problem.dense_hessian() if hessian is None else hessian
    if H.shape != (n, n):
        raise InvalidProblemError(f"The 'hessian' argument of dense_subproblem() must have shape ({n}, {n}). "
                                  f"Got {H.shape}.")
    return DenseSubproblem(H, problem.weights.copy(), np.array(g, dtype=np.float64), 0.0, problem.n_keep,
                           np.arange(n, dtype=np.int64))


def restrict(sub: DenseSubproblem, keep: np.ndarray, prune: np.ndarray) -> DenseSubproblem:
    """Fix ``keep`` (bool (m,), forced in) and ``prune`` (bool (m,), forced out); return the free part.

    Pruned: d_O = −w_O is substituted, b_R += H_RO d_O, constant += ½ w_OᵀH_OO w_O − b_Oᵀw_O.
    Kept: d_I is free and unconstrained, so it is minimised out exactly (Schur complement):
    H_F ← H_FF − H_FI H_II⁻¹ H_IF, b_F ← b_F − H_FI H_II⁻¹ b_I, constant −= ½ b_Iᵀ H_II⁻¹ b_I.
    With no free coordinate left the constant is E of the fixed support.
    """
    H, w, b = sub.hessian, sub.weights, sub.linear
    keep = np.asarray(keep, dtype=bool)
    prune = np.asarray(prune, dtype=bool)
    const = sub.constant
    rest = ~prune
    if prune.any():
        wO = w[prune]
        HRO = H[np.ix_(rest, prune)]
        const += 0.5 * float(wO @ (H[np.ix_(prune, prune)] @ wO)) - float(b[prune] @ wO)
        b_rest = b[rest] - HRO @ wO
    else:
        b_rest = b
    H_rest = H[np.ix_(rest, rest)] if prune.any() else H
    keep_r = keep[rest]
    free_r = ~keep_r
    if keep_r.any():
        HII = H_rest[np.ix_(keep_r, keep_r)]
        HFI = H_rest[np.ix_(free_r, keep_r)]
        bI = b_rest[keep_r]
        factor = scipy.linalg.cho_factor(HII, lower=True, check_finite=False)
        sol = scipy.linalg.cho_solve(factor, np.column_stack([HFI.T, bI]), check_finite=False)
        H_free = H_rest[np.ix_(free_r, free_r)] - HFI @ sol[:, :-1]
        H_free = 0.5 * (H_free + H_free.T)  # keep it exactly symmetric for eigvalsh
        b_free = b_rest[free_r] - HFI @ sol[:, -1]
        const -= 0.5 * float(bI @ sol[:, -1])
    else:
        H_free, b_free = H_rest, b_rest
    free = rest & ~keep
    return DenseSubproblem(H_free, w[free], b_free, float(const), sub.n_keep - int(keep.sum()), sub.index[free])


def subproblem_objective(sub: DenseSubproblem, support: np.ndarray) -> float:
    """E of a support (bool (m,), |support| = n_keep) of the subproblem (exact dense evaluation)."""
    support = np.asarray(support, dtype=bool)
    return restrict(sub, support, ~support).constant


def perspective_shift(hessian: np.ndarray, floor: float = 0.0) -> tuple[float, float]:
    """δ ≈ λ_min(H) (slightly below, so that A = H − δI ⪰ 0 despite rounding) and λ_max(A).

    ``floor`` (e.g. the damping λ, a proven lower bound of λ_min for blocks and their subproblems, since
    principal submatrices and Schur complements of H = F + λI are ⪰ λI) replaces the estimate only when
    rounding put it within 1e-6 relative below the floor. Returns (δ, λ_max(H) − δ); eigvalsh of an m×m matrix.
    """
    if hessian.shape[0] == 0:
        return max(floor, 1.0), 0.0
    ev = scipy.linalg.eigvalsh(hessian, check_finite=False)
    lo, hi = float(ev[0]), float(ev[-1])
    delta = lo - 1e-12 * max(abs(hi), 1e-300)
    if floor > 0 and delta < floor * (1.0 - 1e-9) and lo >= floor * (1.0 - 1e-6):
        # rounding put λ_min a hair below its proven floor; a genuinely smaller λ_min (e.g. an indefinite
        # user-given Fisher) keeps the computed value, so A = H − δI stays PSD either way
        delta = floor * (1.0 - 1e-9)
    delta = max(delta, 1e-300)
    return delta, max(hi - delta, 0.0)


# ----------------------------------------------------------------------------------- dual in step form
def dual_terms(sub: DenseSubproblem, delta: float, d: np.ndarray) -> tuple[float, np.ndarray]:
    """(base, c): D(d, z) = base − zᵀc for the subproblem with shift δ and step d (m,). See the module docstring."""
    H, w, b = sub.hessian, sub.weights, sub.linear
    p = b - delta * w
    Ad = H @ d - delta * d
    u = Ad + p
    c0 = -float(b @ w) + 0.5 * delta * float(w @ w) + sub.constant
    base = -float(Ad @ w) - 0.5 * float(d @ Ad) + c0
    return base, u * u / (2.0 * delta)


def dual_value_at_step(sub: DenseSubproblem, delta: float, d: np.ndarray, z: np.ndarray) -> float:
    """D(d, z) ≤ f(z) for binary z (the cut of step d evaluated at z)."""
    base, c = dual_terms(sub, delta, d)
    return base - float(np.asarray(z, dtype=np.float64) @ c)


def lower_bound_at_step(sub: DenseSubproblem, delta: float, d: np.ndarray) -> float:
    """LB(d) = D(d, k' largest c_i) ≤ min_{|S| = k'} E(S)."""
    base, c = dual_terms(sub, delta, d)
    return base - _top_sum(c, sub.n_keep)


def _top_sum(c: np.ndarray, k: int) -> float:
    if k <= 0:
        return 0.0
    if k >= c.size:
        return float(c.sum())
    return float(np.partition(c, c.size - k)[c.size - k:].sum())


# ----------------------------------------------------------------------------- the relaxation solver
@dataclass
class RelaxationResult:
    """What :func:`solve_perspective` returns.

    bound : best LB(d) seen (a certified lower bound of the subproblem, float).
    value : φ at the last primal iterate (an upper bound on the relaxation's optimum; +inf if unknown).
    v : (m,) last primal iterate; z : (m,) its ρ-optimal z (fractional entries mark the undecided coordinates).
    scores : (m,) c(d) at the best bound (reduced costs: see the B&B's variable fixing).
    base : D(d_best, z) = base − zᵀscores.
    iterations : FISTA iterations; pruned : stopped because bound ≥ ``upper``.
    """

    bound: float
    value: float
    v: np.ndarray
    z: np.ndarray
    scores: np.ndarray
    base: float
    iterations: int
    pruned: bool


def solve_perspective(
    sub: DenseSubproblem,
    delta: float,
    lipschitz: float,
    v0: np.ndarray | None = None,
    upper: float = math.inf,
    max_iter: int = 300,
    rtol: float = 1e-7,
    check_every: int = 4,
    deadline: float | None = None,
    min_iter: int = 0,
) -> RelaxationResult:
    """Maximise LB over steps d by FISTA on the primal perspective relaxation (module docstring).

    Parameters
    ----------
    sub : the subproblem (m free coordinates, k' = sub.n_keep with 0 < k' < m for anything to do).
    delta, lipschitz : δ (0 < δ ≤ λ_min(H)) and λ_max(H − δI) (from :func:`perspective_shift`).
    v0 : (m,) warm start (e.g. the parent node's iterate), default w.
    upper : stop as soon as LB ≥ upper (the node is pruned); also stop once the relaxation's value is
        proven below ``upper`` and the duality gap is under 1 % of (upper − LB) (bound good enough to branch).
    max_iter, rtol : iteration cap; stop when φ − LB ≤ rtol·max(1, |LB|).
    deadline : a ``time.perf_counter()`` value, checked every ``check_every`` iterations once ``min_iter``
        iterations are done (None: no limit).
    """
    H, w, b = sub.hessian, sub.weights, sub.linear
    m, k = sub.size, sub.n_keep
    p = b - delta * w
    c0 = -float(b @ w) + 0.5 * delta * float(w @ w) + sub.constant
    step = 1.0 / max(lipschitz, delta)
    gamma = 0.5 * step * delta
    x = (w.copy() if v0 is None else np.array(v0, dtype=np.float64)).copy()
    y = x.copy()
    theta = 1.0
    best = -math.inf
    best_scores = np.zeros(m)
    best_base = -math.inf
    value = math.inf
    z = np.zeros(m)
    pruned = False
    mu = None
    it = 0
    for it in range(1, max_iter + 1):
        d = y - w
        Ad = H @ d - delta * d
        u = Ad + p
        c = u * u / (2.0 * delta)
        base = -float(Ad @ w) - 0.5 * float(d @ Ad) + c0
        lb = base - _top_sum(c, k)
        if lb > best:
            best, best_scores, best_base = lb, c, base
        if best >= upper:
            pruned = True
            break
        x_new, z, mu = prox_k_support_warm(y - step * u, k, gamma, mu)  # μ moves little between steps
        # adaptive restart (O'Donoghue & Candès): drop the momentum when it points uphill
        if float((y - x_new) @ (x_new - x)) > 0.0:
            theta = 1.0
            y = x_new
        else:
            theta_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
            y = x_new + ((theta - 1.0) / theta_new) * (x_new - x)
            theta = theta_new
        x = x_new
        if it % check_every == 0:
            dx = x - w
            Adx = H @ dx - delta * dx
            ux = Adx + p
            cx = ux * ux / (2.0 * delta)
            basex = -float(Adx @ w) - 0.5 * float(dx @ Adx) + c0
            lbx = basex - _top_sum(cx, k)
            if lbx > best:
                best, best_scores, best_base = lbx, cx, basex
            pos = z > 0
            rho = float((x[pos] ** 2 / z[pos]).sum())
            value = 0.5 * float(dx @ Adx) + float(p @ x) + 0.5 * delta * rho + c0
            gap = value - best
            if best >= upper:
                pruned = True
                break
            if gap <= rtol * max(1.0, abs(best)):
                break
            if math.isfinite(upper) and value < upper and gap <= 0.01 * (upper - best):
                break
            if deadline is not None and it >= min_iter and time.perf_counter() > deadline:
                break
    return RelaxationResult(best, value, x, z, best_scores, best_base, it, pruned)


# ----------------------------------------------------------------------------------------------- cuts
@dataclass(frozen=True)
class Cut:
    """η ≥ value − Σ_i coefficients_i (z_i − support_i)  (valid for every binary z; tight at ``support``).

    value : f(support) (float); coefficients : (n,) c_i ≥ 0; support : (n,) bool; shift : the δ used.
    As a linear constraint: η + cᵀz ≥ value + cᵀsupport.
    """

    value: float
    coefficients: np.ndarray
    support: np.ndarray
    shift: float

    @property
    def rhs(self) -> float:
        """value + cᵀ support, the right-hand side of η + cᵀz ≥ rhs."""
        return self.value + float(self.coefficients[self.support].sum())


def _hessian_times(problem: BlockProblem, d: np.ndarray) -> np.ndarray:
    """H d = Xᵀ(X d) + λ d (or F d + λ d) without forming H when a factor is held."""
    if problem.fisher is not None:
        return problem.fisher @ d + problem.damping * d
    X = problem.factor
    if X.dtype == np.float64:
        return X.T @ (X @ d) + problem.damping * d
    Xd = X.astype(np.float64)
    return Xd.T @ (Xd @ d) + problem.damping * d


def support_cut(problem: BlockProblem, support: np.ndarray, shift: float | None = None) -> Cut:
    """The outer-approximation cut at a support (module docstring), with split δ = ``shift`` (default λ).

    u = (H − δI) d + g − δw at the optimal step d = v*(S) − w, c = u²/(2δ). Valid for any
    0 < δ ≤ λ_min(H); δ = λ is the DESIGN's cut (c_i = (X_iᵀr − λw_i + g_i)²/(2λ), r = X d).
    """
    delta = problem.damping if shift is None else float(shift)
    sol = optimal_update(problem, support)
    d = sol.weights - problem.weights
    u = _hessian_times(problem, d) - delta * d - delta * problem.weights
    if problem.gradient is not None:
        u = u + problem.gradient
    return Cut(float(sol.objective), u * u / (2.0 * delta), np.asarray(support, dtype=bool).copy(), delta)


def cut_value(cut: Cut, z: np.ndarray) -> float:
    """The cut's lower bound at z (any z ∈ [0,1]ⁿ; valid for binary z)."""
    z = np.asarray(z, dtype=np.float64)
    return cut.value - float(cut.coefficients @ (z - cut.support))


# ----------------------------------------------------------------------------------------- dual ascent
@dataclass(frozen=True)
class DualAscentResult:
    """alpha : (N,) the best α found (DESIGN space: α = X d, split δ = λ); bound : LB(alpha);
    history : LB after each improvement (non-decreasing, starts at LB(alpha0)); iterations."""

    alpha: np.ndarray
    bound: float
    history: list[float]
    iterations: int


def _lipschitz_fisher(problem: BlockProblem) -> float:
    """λ_max(F) (exact SVD for small factors, else 30 power iterations inflated by 10 %)."""
    X = problem.factor_matrix().astype(np.float64, copy=False)
    if X.shape[0] * X.shape[1] * min(X.shape) <= 2e8:  # an SVD of at most ~0.1 s
        return float(np.linalg.norm(X, 2) ** 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(X.shape[1])
    est = 0.0
    for _ in range(30):
        y = X.T @ (X @ x)
        est = float(np.linalg.norm(y))
        x = y / max(est, 1e-300)
    return 1.1 * est


def dual_ascent(problem: BlockProblem, alpha0: np.ndarray | None = None, iters: int = 50,
                deadline: float | None = None, v0: np.ndarray | None = None, min_iter: int = 0) -> DualAscentResult:
    """Improve the DESIGN's certificate LB(α) = −αᵀy − ½‖α‖² − (k largest c_i(α)) + (λ/2)‖w‖² − gᵀw.

    LB is concave in α and its maximum is the Boolean (perspective, split δ = λ) relaxation. Method: FISTA
    on the primal relaxation in v (:func:`solve_perspective`'s iteration, matrix-free: only X d and Xᵀr),
    started from the optimal update of the top-k support of c(α₀) (the support α₀ "suggests"), reading
    LB at α = X(v − w) each iteration. The best α seen, α₀ included, is returned, so the bound never
    decreases. Cost: two products with X per iteration; no n×n matrix.

    ``alpha0`` default: −y (the all-pruned residual). ``deadline``: a ``time.perf_counter()`` value after
    which no further iteration starts once ``min_iter`` are done (None: ``iters`` iterations). ``v0`` (n,): the primal start instead
    (e.g. a support's optimal update v*(S), whose α₀ = X(v − w) is then its residual).
    """
    X = problem.factor_matrix().astype(np.float64, copy=False)
    w, lam, k = problem.weights, problem.damping, problem.n_keep
    g = problem.gradient if problem.gradient is not None else np.zeros(problem.n)
    a0 = -problem.target() if alpha0 is None else np.asarray(alpha0, dtype=np.float64)
    best_alpha, best = a0.copy(), dual_bound(problem, alpha=a0)
    history = [best]
    if k == 0 or k == problem.n or iters <= 0:
        return DualAscentResult(best_alpha, best, history, 0)
    if v0 is None:
        c_start = dual_scores(problem, a0)
        start = np.zeros(problem.n, dtype=bool)
        start[np.argsort(-c_start, kind="stable")[:k]] = True
        x = optimal_update(problem, start).weights
    else:
        x = np.array(v0, dtype=np.float64)
    y_pt = x.copy()
    theta = 1.0
    step = 1.0 / max(_lipschitz_fisher(problem), lam)
    gamma = 0.5 * step * lam
    p = g - lam * w
    it = 0
    for it in range(1, iters + 1):
        if deadline is not None and it > min_iter and time.perf_counter() > deadline:
            it -= 1
            break
        alpha = X @ (y_pt - w)
        u = X.T @ alpha + p
        lb = dual_bound(problem, alpha=alpha)
        if lb > best:
            best, best_alpha = lb, alpha
            history.append(best)
        x_new, _ = prox_k_support(y_pt - step * u, k, gamma)
        if float((y_pt - x_new) @ (x_new - x)) > 0.0:
            theta, y_pt = 1.0, x_new
        else:
            theta_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
            y_pt = x_new + ((theta - 1.0) / theta_new) * (x_new - x)
            theta = theta_new
        x = x_new
    return DualAscentResult(best_alpha, best, history, it)
