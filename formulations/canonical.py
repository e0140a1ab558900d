"""Solver-neutral models of the selection problem (DESIGN.md §1): what the solver backends consume.

A :class:`QuadraticModel` is

    min  ½ xᵀ P x + qᵀ x + constant
    s.t. row_lower ≤ A x ≤ row_upper,   lb ≤ x ≤ ub,   x_j integer where integrality_j = 1,

with P symmetric PSD stored as its **lower triangle** (scipy.sparse CSC, diagonal included: the
convention of HiGHS and OSQP), A sparse CSR, every array float64, ±inf for absent bounds. Variables come
in named groups (``var_names``: name → slice), e.g. v (new weights), z (1 = kept), r (residual).

Builders, all from a :class:`~formulations.problem.BlockProblem` with d = v − w:

* :func:`miqp_model` — the exact MIQP with big-M links |v_i| ≤ M_i z_i, Σ z = k, z binary;
  *low-rank form* (variables v, z, r): ½‖r‖² + (λ/2)‖v − w‖² + gᵀd with r = X d (N equality rows, diagonal
  P); *dense form* (v, z): ½ dᵀH d + gᵀd (P = H, n(n+1)/2 entries).
* :func:`qp_relaxation_model` — the same with z ∈ [0, 1] (a convex QP; worthless bound: see below).
* :func:`perspective_relaxation` — the conic (rotated second-order cone) relaxation, for cvxpy.
* :func:`binary_qp_model` — CBS-S: min over z of q(w ⊙ z) (no compensation), Σ z = k, z binary.
* :func:`cut_master_model` / :func:`cut_master_arrays` — min η s.t. outer-approximation cuts
  (formulations.cuts), Σ z = k, z binary (a MILP: what the HiGHS backend solves).

**Big-M** (valid for every g). Let U ≥ E(S*) be an incumbent's value. For any optimal v* with d = v* − w,
q(v*) = gᵀd + ½ dᵀF d + (λ/2)‖d‖² ≥ −‖g‖‖d‖ + (λ/2)‖d‖², so t = ‖d‖ satisfies (λ/2)t² − ‖g‖t − U ≤ 0, i.e.

    ‖d‖ ≤ t_max = (‖g‖ + √(‖g‖² + 2λU)) / λ,      M_i = |w_i| + t_max ≥ |v*_i|,

which is the DESIGN's M_i = |w_i| + √(2U/λ) when g = 0. (‖g‖² + 2λU ≥ 0 always: U ≥ min q ≥ −‖g‖²/(2λ).)

**Why the QP relaxation is worthless.** With z fractional, the unconstrained minimiser u = w − H⁻¹g is
feasible (z_i = |u_i|/M_i, raised to sum to k) as soon as Σ_i |u_i|/M_i ≤ k and |u_i| ≤ M_i, which these
M values (t_max ≥ √(2U/λ) ≫ |w_i| for small λ) make the usual case; the bound is then min q = −½ gᵀH⁻¹g,
i.e. exactly 0 when g = 0 (measured: DESIGN §1b, and ``engine.solvers.highs.qp_relaxation_bound``). The perspective relaxation
replaces (λ/2)(v_i − w_i)² by (λ/2)(s_i − 2w_i v_i + w_i²) with v_i² ≤ s_i z_i, which equals the original at
binary z and makes fractional z pay: its value is the Boolean-relaxation bound of formulations.cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .cuts import Cut
from .errors import InvalidProblemError
from .objective import support_objective
from .problem import BlockProblem

__all__ = [
    "QuadraticModel",
    "PerspectiveModel",
    "big_m",
    "scaled_problem",
    "objective_scale",
    "miqp_model",
    "qp_relaxation_model",
    "perspective_relaxation",
    "binary_qp_model",
    "cut_master_model",
    "cut_master_arrays",
    "miqp_point",
]

INF = math.inf


@dataclass(frozen=True)
class QuadraticModel:
    """min ½xᵀPx + qᵀx + constant s.t. row_lower ≤ Ax ≤ row_upper, lb ≤ x ≤ ub, integrality (module docstring).

    n_vars : int; P : (n_vars, n_vars) lower-triangular CSC; q : (n_vars,); A : (rows, n_vars) CSR;
    row_lower, row_upper : (rows,); lb, ub : (n_vars,); integrality : (n_vars,) int8 (1 = integer);
    var_names : group name → slice of x; sense : "min" (the only sense used); name : free text;
    meta : JSON-able details (e.g. the big-M values' source).
    """

    n_vars: int
    P: sp.csc_matrix
    q: np.ndarray
    constant: float
    A: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    var_names: dict[str, slice]
    sense: str = "min"
    name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        """Number of linear constraints."""
        return self.A.shape[0]

    def full_P(self) -> sp.csc_matrix:
        """The symmetric P from its lower triangle: L + Lᵀ − diag(L)."""
        L = self.P
        return (L + L.T - sp.diags(L.diagonal())).tocsc()

    def objective(self, x: np.ndarray) -> float:
        """½ xᵀ P x + qᵀ x + constant (float64)."""
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * float(x @ (self.full_P() @ x)) + float(self.q @ x) + self.constant

    def violation(self, x: np.ndarray) -> float:
        """Largest violation of rows, bounds and integrality at x (0 when feasible)."""
        x = np.asarray(x, dtype=np.float64)
        ax = self.A @ x
        worst = 0.0
        if ax.size:
            worst = max(worst, float(np.max(self.row_lower - ax, initial=0.0)), float(np.max(ax - self.row_upper, initial=0.0)))
        worst = max(worst, float(np.max(self.lb - x, initial=0.0)), float(np.max(x - self.ub, initial=0.0)))
        ints = self.integrality.astype(bool)
        if ints.any():
            worst = max(worst, float(np.max(np.abs(x[ints] - np.round(x[ints])), initial=0.0)))
        return worst

    def relaxed(self) -> "QuadraticModel":
        """The same model with every variable continuous."""
        return replace(self, integrality=np.zeros(self.n_vars, dtype=np.int8), name=self.name + " (relaxed)")

    def variables(self, name: str, x: np.ndarray) -> np.ndarray:
        """The slice of x for a group (e.g. ``model.variables("z", x)``)."""
        return np.asarray(x)[self.var_names[name]]


@dataclass(frozen=True)
class PerspectiveModel:
    """A conic relaxation: ``model`` (a :class:`QuadraticModel`, all continuous) plus rotated cones
    x[v]² ≤ x[s] · x[z] for each (v, s, z) column triple in ``cones`` ((n, 3) int64). ``shift`` is δ."""

    model: QuadraticModel
    cones: np.ndarray
    shift: float


# ------------------------------------------------------------------------------------------ helpers
def big_m(problem: BlockProblem, upper_bound: float | None = None) -> tuple[np.ndarray, float]:
    """(M (n,), U): M_i = |w_i| + (‖g‖ + √(‖g‖² + 2λU))/λ with U the given value or E(magnitude support)."""
    if upper_bound is None:
        k = problem.n_keep
        support = np.zeros(problem.n, dtype=bool)
        support[np.argsort(-np.abs(problem.weights), kind="stable")[:k]] = True
        upper_bound = support_objective(problem, support)
    U = float(upper_bound)
    if not math.isfinite(U):
        raise InvalidProblemError(f"The 'upper_bound' argument of big_m() must be finite. Got {U}.")
    lam = problem.damping
    gn = 0.0 if problem.gradient is None else float(np.linalg.norm(problem.gradient))
    t_max = (gn + math.sqrt(max(gn * gn + 2.0 * lam * U, 0.0))) / lam
    # a hair of slack so rounding in U can never cut off the optimum
    return np.abs(problem.weights) + t_max * (1.0 + 1e-9) + 1e-12, U


def scaled_problem(problem: BlockProblem, scale: float) -> BlockProblem:
    """The same block with every objective multiplied by ``scale`` = c > 0: E_c(S) = c·E(S) for every S.

    X → √c·X (F → c·F), λ → c·λ, g → c·g; w, k, the optimal support, the update v*(S) and the big-M
    M_i = |w_i| + (‖g‖ + √(‖g‖² + 2λU))/λ (with U → c·U) are unchanged. Why: MIQP solvers judge
    feasibility and optimality with *absolute* tolerances (SCIP: 1e-6 on the epigraph and coupling rows), so
    a block whose optimum is ~1e-5 (real layers, ill-conditioned random ones) is "solved" to a bound a few
    per cent off; backends solve the problem scaled to U = 1 and divide the bound by c.
    """
    c = float(scale)
    if not (math.isfinite(c) and c > 0):
        raise InvalidProblemError(f"The 'scale' argument of scaled_problem() must be a finite number > 0. Got {scale!r}.")
    root = math.sqrt(c)
    return BlockProblem(
        problem.weights, problem.n_keep, problem.damping * c,
        factor=None if problem.factor is None else problem.factor * root,
        fisher=None if problem.fisher is None else problem.fisher * c,
        gradient=None if problem.gradient is None else problem.gradient * c,
        label=problem.label,
    )


#: the largest factor (either way) by which backends rescale a block's objective: measured, SCIP on an
#: ill-conditioned n = 8 block with E* = 2e-8 scaled by 5e7 ran past any time limit (and, with none, hung),
#: where scaled by at most 1e4 it returns at once
MAX_OBJECTIVE_SCALE = 1e4


def objective_scale(upper_bound: float) -> float:
    """c = 1/U clipped to [1/MAX_OBJECTIVE_SCALE, MAX_OBJECTIVE_SCALE] (1 when U is not finite and > 0):
    the factor for :func:`scaled_problem` that brings an incumbent value U towards 1."""
    U = float(upper_bound)
    if not (math.isfinite(U) and U > 0):
        return 1.0
    return min(max(1.0 / U, 1.0 / MAX_OBJECTIVE_SCALE), MAX_OBJECTIVE_SCALE)


def _lower_csc(M: np.ndarray | sp.spmatrix) -> sp.csc_matrix:
    return sp.tril(sp.csc_matrix(M)).tocsc()


def _use_low_rank(problem: BlockProblem, low_rank: bool | None) -> bool:
    if problem.factor is None:
        if low_rank:
            raise InvalidProblemError(
                "The 'low_rank' argument of miqp_model() can be True only for a problem holding a factor X. "
                "Got a problem with a dense fisher."
            )
        return False
    if low_rank is not None:
        return bool(low_rank)
    N, n = problem.factor.shape
    # fewer nonzeros wins: N·n (rows r = X d) + N + n against n(n+1)/2 (dense H)
    return N * n + N + n < n * (n + 1) // 2


# ----------------------------------------------------------------------------------------- builders
def miqp_model(problem: BlockProblem, upper_bound: float | None = None, low_rank: bool | None = None) -> QuadraticModel:
    """The exact MIQP (module docstring). Variables: v (n), z (n) and, in low-rank form, r (N).

    Rows: [Σ z = k], [v_i − M_i z_i ≤ 0], [−v_i − M_i z_i ≤ 0] and, low-rank, [r − X v = −X w].
    ``low_rank`` None picks the form with fewer nonzeros. v is also bounded by ±M (helps solvers).
    """
    n, k, lam = problem.n, problem.n_keep, problem.damping
    w = problem.weights
    g = problem.gradient if problem.gradient is not None else np.zeros(n)
    M, U = big_m(problem, upper_bound)
    lr = _use_low_rank(problem, low_rank)
    N = problem.factor.shape[0] if lr else 0
    nv = 2 * n + N
    sv, sz, sr = slice(0, n), slice(n, 2 * n), slice(2 * n, 2 * n + N)
    eye = sp.identity(n, format="csr")
    q = np.zeros(nv)
    if lr:
        X = np.asarray(problem.factor, dtype=np.float64)
        P = sp.block_diag([lam * eye, sp.csr_matrix((n, n)), sp.identity(N)], format="csc")
        q[sv] = g - lam * w
        constant = 0.5 * lam * float(w @ w) - float(g @ w)
    else:
        H = problem.dense_hessian()
        P = sp.block_diag([sp.csr_matrix(H), sp.csr_matrix((n, n))], format="csc")
        q[sv] = g - H @ w
        constant = 0.5 * float(w @ H @ w) - float(g @ w)
    rows = [sp.hstack([sp.csr_matrix((1, n)), sp.csr_matrix(np.ones((1, n))), sp.csr_matrix((1, N))])]
    lo, hi = [np.array([float(k)])], [np.array([float(k)])]
    Mdiag = sp.diags(M)
    rows.append(sp.hstack([eye, -Mdiag, sp.csr_matrix((n, N))]))
    rows.append(sp.hstack([-eye, -Mdiag, sp.csr_matrix((n, N))]))
    lo += [np.full(n, -INF), np.full(n, -INF)]
    hi += [np.zeros(n), np.zeros(n)]
    if lr:
        rows.append(sp.hstack([sp.csr_matrix(-X), sp.csr_matrix((N, n)), sp.identity(N)]))
        y = X @ w
        lo.append(-y)
        hi.append(-y)
    A = sp.vstack(rows, format="csr")
    lb = np.concatenate([-M, np.zeros(n), np.full(N, -INF)])
    ub = np.concatenate([M, np.ones(n), np.full(N, INF)])
    integrality = np.concatenate([np.zeros(n), np.ones(n), np.zeros(N)]).astype(np.int8)
    names = {"v": sv, "z": sz}
    if lr:
        names["r"] = sr
    return QuadraticModel(
        nv, _lower_csc(P), q, constant, A, np.concatenate(lo), np.concatenate(hi), lb, ub, integrality, names,
        name=f"miqp[{'low-rank' if lr else 'dense'}] {problem.label}".strip(),
        meta={"big_m_upper_bound": U, "low_rank": lr},
    )


def miqp_point(model: QuadraticModel, problem: BlockProblem, support: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The MIQP point x of a support (bool (n,)) and its updated weights v (n,): (v, z, r = X(v − w))."""
    x = np.zeros(model.n_vars)
    x[model.var_names["v"]] = weights
    x[model.var_names["z"]] = np.asarray(support, dtype=np.float64)
    if "r" in model.var_names:
        x[model.var_names["r"]] = np.asarray(problem.factor, dtype=np.float64) @ (weights - problem.weights)
    return x


def qp_relaxation_model(problem: BlockProblem, upper_bound: float | None = None, low_rank: bool | None = None) -> QuadraticModel:
    """The continuous relaxation of :func:`miqp_model` (z ∈ [0, 1]); its optimum is a (weak) lower bound."""
    return miqp_model(problem, upper_bound, low_rank).relaxed()


def perspective_relaxation(problem: BlockProblem, shift: float | None = None) -> PerspectiveModel:
    """The perspective relaxation as a conic model (for cvxpy with CLARABEL/SCS).

    With the split H = A + δI (δ = ``shift``, default λ; any 0 < δ ≤ λ_min(H) is valid, larger is tighter),
    variables v (n), s (n), z (n), and

        min  ½ dᵀ A d + gᵀd + (δ/2) Σ_i (s_i − 2 w_i v_i + w_i²)
        s.t. v_i² ≤ s_i z_i (rotated cones),  Σ z = k,  0 ≤ z ≤ 1,  s ≥ 0.

    At binary z, s_i = v_i² (kept) or v_i = 0 (pruned), so the objective is q(v): exact; for z ∈ [0, 1] it
    is the Boolean relaxation, whose value equals max over α of the dual bound (formulations.cuts).
    A = H − δI is stored dense (P over v) — small blocks only.
    """
    n, k, lam = problem.n, problem.n_keep, problem.damping
    delta = lam if shift is None else float(shift)
    w = problem.weights
    g = problem.gradient if problem.gradient is not None else np.zeros(n)
    A_mat = problem.dense_hessian() - delta * np.eye(n)
    sv, ss, sz = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    P = sp.block_diag([sp.csr_matrix(A_mat), sp.csr_matrix((2 * n, 2 * n))], format="csc")
    q = np.zeros(3 * n)
    q[sv] = g - A_mat @ w - delta * w
    q[ss] = 0.5 * delta
    constant = 0.5 * float(w @ A_mat @ w) - float(g @ w) + 0.5 * delta * float(w @ w)
    A = sp.csr_matrix(np.concatenate([np.zeros(2 * n), np.ones(n)])[None, :])
    lb = np.concatenate([np.full(n, -INF), np.zeros(n), np.zeros(n)])
    ub = np.concatenate([np.full(n, INF), np.full(n, INF), np.ones(n)])
    model = QuadraticModel(
        3 * n, _lower_csc(P), q, constant, A, np.array([float(k)]), np.array([float(k)]), lb, ub,
        np.zeros(3 * n, dtype=np.int8), {"v": sv, "s": ss, "z": sz},
        name=f"perspective {problem.label}".strip(), meta={"shift": delta},
    )
    cones = np.stack([np.arange(n), n + np.arange(n), 2 * n + np.arange(n)], axis=1).astype(np.int64)
    return PerspectiveModel(model, cones, delta)


def binary_qp_model(problem: BlockProblem) -> QuadraticModel:
    """CBS-S: min over z ∈ {0,1}ⁿ, Σz = k, of q(w ⊙ z) = ½ uᵀHu − gᵀu with u = w ⊙ (1 − z).

    In z (W = diag w): P = W H W, q = W(g − H w), constant = ½ wᵀHw − gᵀw. Equals
    ``formulations.objective.selection_objective`` at every binary z.
    """
    n, k = problem.n, problem.n_keep
    w = problem.weights
    g = problem.gradient if problem.gradient is not None else np.zeros(n)
    H = problem.dense_hessian()
    P = (w[:, None] * H) * w[None, :]
    q = w * (g - H @ w)
    constant = 0.5 * float(w @ H @ w) - float(g @ w)
    return QuadraticModel(
        n, _lower_csc(P), q, constant, sp.csr_matrix(np.ones((1, n))), np.array([float(k)]), np.array([float(k)]),
        np.zeros(n), np.ones(n), np.ones(n, dtype=np.int8), {"z": slice(0, n)},
        name=f"binary-qp {problem.label}".strip(),
    )


def cut_master_model(problem: BlockProblem, cuts: Sequence[Cut], eta_lower: float = -INF) -> QuadraticModel:
    """The cutting-plane master of a block: min η s.t. η + c_jᵀz ≥ rhs_j for each ``formulations.cuts.Cut``,
    Σ z = k, z binary (see :func:`cut_master_arrays`)."""
    C = np.array([c.coefficients for c in cuts], dtype=np.float64).reshape(len(cuts), problem.n)
    rhs = np.array([c.rhs for c in cuts], dtype=np.float64)
    return cut_master_arrays(problem.n, problem.n_keep, C, rhs, eta_lower)


def cut_master_arrays(
    n: int, n_keep: int, coefficients: np.ndarray, rhs: np.ndarray, eta_lower: float = -INF
) -> QuadraticModel:
    """The cutting-plane master: min η s.t. η + C z ≥ rhs (one row per cut), Σ z = k, z binary.

    coefficients : (cuts, n) c ≥ 0 (``formulations.cuts.Cut.coefficients``); rhs : (cuts,) (``Cut.rhs``).
    Variables: z (n) then η; P = 0 (a MILP). ``eta_lower``: any valid lower bound (e.g. a relaxation's).
    Row 0 is Σ z = k; rows 1.. are the cuts, in order.
    """
    C = np.atleast_2d(np.asarray(coefficients, dtype=np.float64)).reshape(-1, n)
    rhs = np.asarray(rhs, dtype=np.float64).ravel()
    rows = sp.vstack(
        [sp.csr_matrix(np.concatenate([np.ones(n), [0.0]])[None, :]), sp.csr_matrix(np.hstack([C, np.ones((C.shape[0], 1))]))],
        format="csr",
    )
    lo = np.concatenate([[float(n_keep)], rhs])
    hi = np.concatenate([[float(n_keep)], np.full(rhs.size, INF)])
    q = np.zeros(n + 1)
    q[n] = 1.0
    return QuadraticModel(
        n + 1, sp.csc_matrix((n + 1, n + 1)), q, 0.0, rows, lo, hi,
        np.concatenate([np.zeros(n), [eta_lower]]), np.concatenate([np.ones(n), [INF]]),
        np.concatenate([np.ones(n), [0]]).astype(np.int8), {"z": slice(0, n), "eta": slice(n, n + 1)},
        name="cut-master",
    )
