"""The one source of truth for the objective (DESIGN.md §1): E(S), the optimal update, the dual bound.

Notation (float64 throughout): ``w`` (n,), ``X`` (N, n), ``y = Xw``, ``λ > 0``, optional ``g`` (n,),
``H = XᵀX + λI``. A *support* is a boolean mask of shape (n,), True = kept (S); P = the rest.

**Quadratic model**  q(v) = gᵀ(v − w) + ½‖X(v − w)‖² + (λ/2)‖v − w‖².

**Optimal update** (the CBS-U update). With v_P = 0 fixed, the kept weights solve

    (X_SᵀX_S + λI) v_S = X_Sᵀ y + λ w_S − g_S,

i.e. the least-squares problem  min ‖[X_S; √λ I] v_S − [y; √λ (w_S − g_S/λ)]‖²  (the *augmented
system*). We solve it by Cholesky on the k×k system when k ≤ N, and by Woodbury

    (λI + X_SᵀX_S)⁻¹ = (1/λ) [I − X_Sᵀ (λI_N + X_S X_Sᵀ)⁻¹ X_S]

(an N×N Cholesky) when N < k. When a Cholesky factor is too ill-conditioned to trust
(estimated condition number above ``COND_LIMIT``) or fails, we fall back to an SVD-based
least-squares solve of the augmented system and emit an :class:`IllConditionedWarning`.

**Mixed precision** ("float32 where it is safe"). The gradients X are stored in float32. When the
system's order min(N, k) is at least ``MIXED_MIN``, the Gram matrix is formed in float32 (half the time
of the float64 product that dominates a large update) and factored in float32 (in float64 when float32
cannot factor it). That factor only preconditions conjugate gradients on the exact float64 system, run to
a backward error of ``MIXED_TOL``: the answer is as accurate as the float64 Cholesky solve, not a float32
one. Should that not converge, the float64 Cholesky runs.

**E(S)** = q(v*) evaluated directly from the residual r = X(v* − w), which is exact and cheap.

**Dual bound.** For any α ∈ R^N and z ∈ {0,1}ⁿ (z_i = 1: kept),

    f(z) ≥ D(α, z) = −αᵀy − ½‖α‖² − Σ_i z_i c_i(α) + (λ/2)‖w‖² − gᵀw,
    c_i(α) = (X_iᵀα − λ w_i + g_i)² / (2λ),

with equality at α = X v*(z) − y. Minimising over |S| = k takes the k largest c_i:
LB(α) = D(α, top-k) ≤ min_{|S|=k} E(S). Evaluated at any support's own residual it certifies that
support's optimality gap at the cost of one pass over X.

**CBS-S objective** (selection without compensation): q(w ⊙ z) = −g_Pᵀw_P + ½‖X_P w_P‖² + (λ/2)‖w_P‖²
= ½ w_Pᵀ H_PP w_P − g_Pᵀ w_P. With λ → 0 and g = 0 it is the paper's w_PᵀF_PPw_P (up to the ½).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from .errors import InvalidProblemError
from .patterns import group_top_sum, pattern_violation
from .problem import BlockProblem
from .solutions import MEMO_SIZE, SupportSolution, UpdateMemo

__all__ = [
    "IllConditionedWarning",
    "SupportSolution",
    "as_support",
    "quadratic_model",
    "joint_quadratic_model",
    "block_step_sizes",
    "optimal_update",
    "remembered_update",
    "UpdateMemo",
    "support_objective",
    "dual_bound",
    "dual_value",
    "dual_scores",
    "kept_score_sum",
    "relative_gap",
    "selection_objective",
    "COND_LIMIT",
    "MEMO_SIZE",
]

#: Condition number above which a Cholesky solve is not trusted (float64 has ~16 digits).
COND_LIMIT = 1e12

#: order (min(N, k)) from which the update system of a float32 factor is solved in mixed precision
#: (:func:`_mixed_solve`); smaller systems take the plain float64 Cholesky, whose cost is negligible there
MIXED_MIN = 1024
#: the mixed solve's conjugate gradients stop at a residual of MIXED_TOL·‖A‖·‖v‖ (a backward error)
MIXED_TOL = 1e-16
MIXED_MAX_ITER = 30


class IllConditionedWarning(UserWarning):
    """The update's linear system is too ill-conditioned for Cholesky; an SVD solve was used."""


def as_support(problem: BlockProblem, support: np.ndarray, check_size: bool = True) -> np.ndarray:
    """Validate a support and return it as a boolean array (n,).

    Accepts a boolean mask of shape (n,) or an integer array of kept indices (unique, in range).
    With ``check_size``, the number of kept weights must equal ``problem.n_keep``.
    """
    s = np.asarray(support)
    n = problem.n
    if s.dtype == bool:
        if s.shape != (n,):
            raise InvalidProblemError(
                f"The 'support' argument must be a boolean mask of shape ({n},) or kept indices. Got a mask of shape {s.shape}."
            )
        mask = s.copy()
    elif np.issubdtype(s.dtype, np.integer) or s.size == 0:
        idx = s.astype(np.intp).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InvalidProblemError(
                f"The 'support' argument's indices must be in [0, {n - 1}]. Got min {idx.min()}, max {idx.max()}."
            )
        if np.unique(idx).size != idx.size:
            raise InvalidProblemError("The 'support' argument's indices must be unique. Got repeated indices.")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
    else:
        raise InvalidProblemError(
            f"The 'support' argument must be a boolean mask or an integer index array. Got dtype {s.dtype}."
        )
    if check_size and int(mask.sum()) != problem.n_keep:
        raise InvalidProblemError(
            f"The 'support' argument must keep exactly n_keep = {problem.n_keep} weights. Got {int(mask.sum())}."
        )
    if check_size and problem.pattern is not None:
        broken = pattern_violation(mask, problem.pattern)
        if broken:
            N, M = problem.pattern
            raise InvalidProblemError(f"The 'support' argument must follow the block's {N}:{M} pattern: {broken}.")
    return mask


def quadratic_model(problem: BlockProblem, v: np.ndarray) -> float:
    """q(v) = gᵀ(v − w) + ½‖X(v − w)‖² + (λ/2)‖v − w‖² for a full vector v (n,)."""
    d = np.asarray(v, dtype=np.float64) - problem.weights
    return _q_from(problem, d, problem.matvec(d))


def _shared_rows(problems: Sequence[BlockProblem], where: str) -> int:
    if len(problems) == 0:
        raise InvalidProblemError(f"The 'problems' argument of {where} must hold at least one block. Got none.")
    rows = {p.factor.shape[0] if p.factor is not None else None for p in problems}
    if None in rows or len(rows) != 1:
        raise InvalidProblemError(
            f"The 'problems' argument of {where} must be blocks with gradient-row factors X_b of the same samples "
            f"(one row count N). Got row counts {sorted(str(r) for r in rows)}."
        )
    return rows.pop()


def joint_quadratic_model(problems: Sequence[BlockProblem], vs: Sequence[np.ndarray]) -> float:
    """The blocks' quadratic model taken together, cross-block curvature included:

        Q(v_1, …, v_B) = ½‖Σ_b X_b d_b‖² + Σ_b [(λ_b/2)‖d_b‖² + g_bᵀd_b],   d_b = v_b − w_b,

    i.e. the model of the whole network whose Fisher is the full GᵀG/N of the blocks' shared gradient
    rows (X_b = G_b/√N, all with the same N rows) instead of its block diagonal. Σ_b q_b(v_b) is Q
    without the cross terms Σ_{b≠c} (X_b d_b)ᵀ(X_c d_c)."""
    _shared_rows(problems, "joint_quadratic_model()")
    if len(vs) != len(problems):
        raise InvalidProblemError(f"The 'vs' argument of joint_quadratic_model() must hold one vector per block "
                                  f"({len(problems)}). Got {len(vs)}.")
    total_r = None
    value = 0.0
    for p, v in zip(problems, vs):
        d = np.asarray(v, dtype=np.float64) - p.weights
        r = p.matvec(d)
        total_r = r if total_r is None else total_r + r
        value += 0.5 * p.damping * float(d @ d) + (float(p.gradient @ d) if p.gradient is not None else 0.0)
    return value + 0.5 * float(total_r @ total_r)


def block_step_sizes(problems: Sequence[BlockProblem], supports: Sequence[np.ndarray],
                     vs: Sequence[np.ndarray]) -> np.ndarray:
    """One step size per block, τ (B,), minimising the joint model Q (:func:`joint_quadratic_model`) along
    each block's own update direction:

        v_b(τ_b) = m_b + τ_b e_b,   m_b = w_b on S_b and 0 off it (the masked weights),  e_b = v_b − m_b.

    Each v_b is the block's own best update (τ_b = 1 minimises its q_b alone); together they ignore the
    cross-block curvature, and the blocks overshoot when their steps point the same way. With
    z_b = X_b e_b, ρ = Σ_c X_c (m_c − w_c):

        Q = const + Σ_b τ_b c_b + ½ τᵀMτ,   M_bc = z_bᵀz_c + δ_bc λ_b‖e_b‖²,   c_b = z_bᵀρ + g_bᵀe_b,

    (λ_b e_bᵀ(m_b − w_b) = 0: disjoint supports), so τ = −M⁻¹c, a B×B solve after one product X_b e_b
    per block. A block whose update does not move it (e_b = 0) gets τ_b = 1. M is positive definite on
    the others (λ_b > 0), so the solution is the unique minimiser."""
    _shared_rows(problems, "block_step_sizes()")
    if not (len(supports) == len(vs) == len(problems)):
        raise InvalidProblemError(f"The 'supports' and 'vs' arguments of block_step_sizes() must hold one entry per "
                                  f"block ({len(problems)}). Got {len(supports)} and {len(vs)}.")
    z, e_sq, lin = [], [], []
    rho = None
    for p, support, v in zip(problems, supports, vs):
        mask = as_support(p, support, check_size=False)
        m = np.where(mask, p.weights, 0.0)
        e = np.asarray(v, dtype=np.float64) - m
        r = p.matvec(m - p.weights)
        rho = r if rho is None else rho + r
        z.append(p.matvec(e))
        e_sq.append(float(e @ e))
        lin.append(float(p.gradient @ e) if p.gradient is not None else 0.0)
    tau = np.ones(len(problems))
    moving = np.flatnonzero(np.asarray(e_sq) > 0)
    if moving.size == 0:
        return tau
    Z = np.stack([z[i] for i in moving])
    M = Z @ Z.T + np.diag([problems[i].damping * e_sq[i] for i in moving])
    c = Z @ rho + np.asarray([lin[i] for i in moving])
    tau[moving] = scipy.linalg.solve(M, -c, assume_a="pos")
    return tau


def _q_from(problem: BlockProblem, d: np.ndarray, r: np.ndarray) -> float:
    value = 0.5 * float(r @ r) + 0.5 * problem.damping * float(d @ d)
    if problem.gradient is not None:
        value += float(problem.gradient @ d)
    return value


def _factor_trusted(L: np.ndarray) -> bool:
    """Whether a Cholesky factor L may be used: its diagonal estimates cond(A) ≈ (max|L_ii| / min|L_ii|)²,
    which must not exceed ``COND_LIMIT``."""
    d = np.abs(np.diag(L))
    return not (d.min() <= 0 or (d.max() / d.min()) ** 2 > COND_LIMIT)


def _chol_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Solve A x = b for SPD A by Cholesky; None when it fails or is ill-conditioned."""
    try:
        c, low = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    if not _factor_trusted(c):
        return None
    return scipy.linalg.cho_solve((c, low), b, check_finite=False)


def _row_chunk(k: int) -> int:
    return max(1, (8 << 20) // max(k, 1))  # rows per float64 chunk of X_S: about 64 MiB


def _xs_matvec(XS: np.ndarray, v: np.ndarray) -> np.ndarray:
    """X_S v (N,) in float64 from a float32 X_S (N, k), by row chunks (never a whole float64 copy)."""
    step = _row_chunk(XS.shape[1])
    return np.concatenate([XS[s : s + step].astype(np.float64) @ v for s in range(0, XS.shape[0], step)])


def _xs_rmatvec(XS: np.ndarray, u: np.ndarray) -> np.ndarray:
    """X_Sᵀ u (k,) in float64 from a float32 X_S (N, k), by row chunks."""
    step = _row_chunk(XS.shape[1])
    out = np.zeros(XS.shape[1])
    for s in range(0, XS.shape[0], step):
        out += XS[s : s + step].astype(np.float64).T @ u[s : s + step]
    return out


def _mixed_solve(XS: np.ndarray, lam: float, rhs: np.ndarray, outer: bool) -> np.ndarray | None:
    """v_S of A v_S = rhs, A = X_SᵀX_S + λI (k×k), for a float32 X_S (N, k), to float64 accuracy.

    The Gram matrix (X_SᵀX_S, k×k, or X_S X_Sᵀ, N×N when ``outer``) is formed in float32 by BLAS ssyrk:
    half the time of the float64 product, which dominates large updates, and half its memory. Its
    Cholesky factor L (of the float32 Gram + λI, by spotrf; by dpotrf when spotrf fails) only
    preconditions: P⁻¹ = (L Lᵀ)⁻¹ for the k×k form, and by Woodbury P⁻¹r = (r − X_Sᵀ (L Lᵀ)⁻¹ X_S r)/λ
    for the N×N one. Conjugate gradients then solve the float64 system itself, every product with X_S
    exact in float64 (row chunks), until the residual is below ``MIXED_TOL``·‖A‖·‖v_S‖: a backward
    error as small as a float64 Cholesky solve's (‖A‖ ≤ λ + ‖X_S‖²_F = λ + trace of the Gram). The
    float32 Gram's error (about 1e-7 of its largest entry) leaves the preconditioned operator near the
    identity, so CG takes a few steps. None when the factor fails the conditioning test
    (:func:`_factor_trusted`) or CG does not get there in ``MIXED_MAX_ITER`` steps: the caller then
    takes the float64 path.
    """
    G = blas.ssyrk(1.0, XS.T, trans=1 if outer else 0, lower=1)  # Fortran sees XS (C order) as XSᵀ
    norm_a = lam + float(np.trace(G, dtype=np.float64))
    G[np.diag_indices_from(G)] += np.float32(lam)
    # the factor is a preconditioner only: factor in float32 too (half the time again), in float64 when
    # float32 cannot (a condition number near 1e7 makes spotrf fail)
    L32, info = lapack.spotrf(G, lower=1, clean=1, overwrite_a=0)
    if info == 0:
        L = L32.astype(np.float64)
    else:
        A = G.astype(np.float64)
        A[np.diag_indices_from(A)] += lam - float(np.float32(lam))
        L, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
    del G, L32
    if not _factor_trusted(L):
        return None

    def op(v: np.ndarray) -> np.ndarray:
        return lam * v + _xs_rmatvec(XS, _xs_matvec(XS, v))

    def precondition(r: np.ndarray) -> np.ndarray:
        if outer:
            t = scipy.linalg.cho_solve((L, True), _xs_matvec(XS, r), check_finite=False)
            return (r - _xs_rmatvec(XS, t)) / lam
        return scipy.linalg.cho_solve((L, True), r, check_finite=False)

    v = precondition(rhs)
    r = rhs - op(v)
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    for _ in range(MIXED_MAX_ITER):
        if np.linalg.norm(r) <= MIXED_TOL * norm_a * np.linalg.norm(v) or rz <= 0:
            return v
        Ap = op(p)
        alpha = rz / float(p @ Ap)
        v += alpha * p
        r -= alpha * Ap
        z = precondition(r)
        rz_next = float(r @ z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return None


def remembered_update(problem: BlockProblem, support: np.ndarray, memo: UpdateMemo | None) -> SupportSolution | None:
    """The solution ``optimal_update(problem, support, memo)`` already computed, if ``memo`` holds it
    (a copy; None otherwise, and always None without a memo). ``support``: mask (n,) or kept indices."""
    if memo is None:
        return None
    return memo.get(problem, as_support(problem, support, check_size=False))


def optimal_update(problem: BlockProblem, support: np.ndarray, memo: UpdateMemo | None = None) -> SupportSolution:
    """The CBS-U update and E(S) for a support (see the module docstring for the equations).

    With a ``memo`` (:class:`UpdateMemo`, one per block, owned by the caller) a support solved before is
    returned as a copy instead of solved again, and a new solve is remembered there. Without one nothing
    is remembered.

    Parameters
    ----------
    problem : BlockProblem
    support : (n,) bool or kept indices. Its size need not equal ``n_keep`` (used by greedy methods).
    memo : UpdateMemo, optional

    Returns
    -------
    SupportSolution with ``weights`` v (n,) float64, v_P = 0.
    """
    S = as_support(problem, support, check_size=False)
    if memo is None:
        return _solve_support(problem, S)
    known = memo.get(problem, S)
    if known is not None:
        return known
    sol = _solve_support(problem, S)
    memo.put(problem, S, sol)
    return sol


def _solve_support(problem: BlockProblem, S: np.ndarray) -> SupportSolution:
    """``optimal_update`` without the memo: S is a boolean mask (n,)."""
    w, lam, g = problem.weights, problem.damping, problem.gradient
    X = problem.factor_matrix()
    idx = np.flatnonzero(S)
    k = idx.size
    v = np.zeros(problem.n)
    method = "trivial"
    if k:
        N = X.shape[0]
        y = problem.target()
        vS = None
        if X.dtype == np.float32 and min(N, k) >= MIXED_MIN:
            XS32 = X[:, idx]
            rhs = _xs_rmatvec(XS32, y) + lam * w[idx]
            if g is not None:
                rhs -= g[idx]
            vS = _mixed_solve(XS32, lam, rhs, outer=k > N)
            method = ("woodbury" if k > N else "cholesky") + "+cg"
            del XS32
        if vS is None:
            vS, method = _float64_solve(problem, idx, y)
        v[idx] = vS
    d = v - w
    Xd = problem.matvec(d)
    return SupportSolution(weights=v, objective=_q_from(problem, d, Xd), residual=Xd, method=method)


def _float64_solve(problem: BlockProblem, idx: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str]:
    """v_S for the kept indices ``idx`` by the float64 Cholesky (k×k, or N×N by Woodbury when N < k), and
    the SVD solve of the augmented system when that is too ill-conditioned (warns); and the method used."""
    w, lam, g = problem.weights, problem.damping, problem.gradient
    XS = np.asarray(problem.factor_matrix()[:, idx], dtype=np.float64)
    N, k = XS.shape
    rhs = XS.T @ y + lam * w[idx]
    if g is not None:
        rhs -= g[idx]
    if k <= N:
        A = XS.T @ XS
        A[np.diag_indices_from(A)] += lam
        vS = _chol_solve(A, rhs)
        method = "cholesky"
    else:
        M = XS @ XS.T
        M[np.diag_indices_from(M)] += lam
        t = _chol_solve(M, XS @ rhs)
        vS = None if t is None else (rhs - XS.T @ t) / lam
        method = "woodbury"
    if vS is None:
        warnings.warn(
            f"The update system of block '{problem.label or '?'}' (k = {k}, N = {N}, λ = {lam:g}) is too "
            f"ill-conditioned for Cholesky (estimated condition number > {COND_LIMIT:g}); "
            "solving the augmented least-squares system by SVD instead.",
            IllConditionedWarning,
            stacklevel=4,  # the caller of optimal_update (through _solve_support)
        )
        sq = np.sqrt(lam)
        target = w[idx] - (g[idx] / lam if g is not None else 0.0)
        A_aug = np.vstack([XS, sq * np.eye(k)])
        b_aug = np.concatenate([y, sq * target])
        vS = scipy.linalg.lstsq(A_aug, b_aug, check_finite=False, lapack_driver="gelsd")[0]
        method = "lstsq"
    return vS, method


def support_objective(problem: BlockProblem, support: np.ndarray) -> float:
    """E(S) = min {q(v) : v_P = 0} for a support of size ``n_keep``."""
    return optimal_update(problem, as_support(problem, support)).objective


def dual_scores(problem: BlockProblem, alpha: np.ndarray) -> np.ndarray:
    """c_i(α) = (X_iᵀα − λ w_i + g_i)² / (2λ), shape (n,), float64."""
    u = problem.rmatvec(alpha) - problem.damping * problem.weights
    if problem.gradient is not None:
        u = u + problem.gradient
    return u * u / (2.0 * problem.damping)


def dual_value(problem: BlockProblem, alpha: np.ndarray, support: np.ndarray) -> float:
    """D(α, z) for a fixed support z: a lower bound on E(S(z)), tight at α = X v*(z) − y."""
    S = as_support(problem, support, check_size=False)
    return _dual_constant(problem, alpha) - float(dual_scores(problem, alpha)[S].sum())


def _dual_constant(problem: BlockProblem, alpha: np.ndarray) -> float:
    a = np.asarray(alpha, dtype=np.float64)
    y = problem.target()
    const = -float(a @ y) - 0.5 * float(a @ a) + 0.5 * problem.damping * float(problem.weights @ problem.weights)
    if problem.gradient is not None:
        const -= float(problem.gradient @ problem.weights)
    return const


def dual_bound(problem: BlockProblem, alpha: np.ndarray | None = None, support: np.ndarray | None = None) -> float:
    """LB(α) = D(α, k largest c_i) ≤ min_{|S|=k} E(S); under an N:M pattern, the N largest c_i of every
    group (the best a pattern-respecting support can do), a bound on the N:M optimum.

    Pass ``alpha`` directly, or a ``support`` whose own residual r = X v*(S) − y is used as α
    (the free certificate of any heuristic answer). With neither, α = −y (the residual of the
    all-pruned support).
    """
    if alpha is None:
        if support is None:
            alpha = -problem.target()
        else:
            alpha = optimal_update(problem, support).residual
    return _dual_constant(problem, alpha) - kept_score_sum(problem, dual_scores(problem, alpha))


def kept_score_sum(problem: BlockProblem, scores: np.ndarray) -> float:
    """The largest sum of ``scores`` (n,) a support of the block can keep: its n_keep largest, or under an N:M
    pattern the N largest of every group. The dual bound at any dual point is its constant minus this sum."""
    c = np.asarray(scores, dtype=np.float64)
    if c.shape != (problem.n,):
        raise InvalidProblemError(f"The 'scores' argument of kept_score_sum() must have shape ({problem.n},). "
                                  f"Got {c.shape}.")
    if problem.pattern is not None:
        return group_top_sum(c, problem.pattern)
    k = problem.n_keep
    return 0.0 if k == 0 else float(np.partition(c, c.size - k)[c.size - k:].sum())


def relative_gap(objective: float, bound: float | None) -> float | None:
    """(objective − bound) / max(|objective|, 1e-12), clipped at 0; None without a bound.

    A gap of 0 means proven optimal (to the tolerance of the bound).
    """
    if bound is None or not np.isfinite(bound):
        return None
    gap = (objective - bound) / max(abs(objective), 1e-12)
    return max(0.0, float(gap))


def selection_objective(problem: BlockProblem, support: np.ndarray) -> float:
    """The CBS-S binary-QP objective: q(w ⊙ z) = ½ w_Pᵀ H_PP w_P − g_Pᵀ w_P (no compensation)."""
    S = as_support(problem, support, check_size=False)
    v = np.where(S, problem.weights, 0.0)
    return quadratic_model(problem, v)
