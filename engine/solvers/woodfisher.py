"""WoodFisher / OBS single-weight saliency: keep the k weights of largest ρ_i = w_i² / [H⁻¹]_ii.

With H = XᵀX + λI (n×n; X is the factor, shape (N, n)), ρ_i/2 is the loss increase of removing weight i
alone and re-optimising all the others (Optimal Brain Surgeon). Selecting the top-k scores is the
WoodFisher rule (Singh & Alistarh 2020); the engine then applies the joint CBS-U update to the support.

The gradient g does not enter ρ (the classic score assumes a minimum); the update still uses it.

Two ways to get diag(H⁻¹), both float64:

* **dense** (n ≤ N, or a dense Fisher is held): H = XᵀX + λI (n×n), Cholesky H = LLᵀ, H⁻¹ from L
  (LAPACK potri), read the diagonal. O(Nn² + n³) time, O(n²) memory.
* **woodbury** (N < n): never forms an n×n matrix.

      H⁻¹ = (1/λ) [I − Xᵀ M⁻¹ X],   M = λI_N + XXᵀ (N×N),
      [H⁻¹]_ii = (1/λ) (1 − X_iᵀ M⁻¹ X_i) = (1/λ) (1 − ‖L⁻¹ X_i‖²),   M = LLᵀ,

  with X_i the i-th column. M is accumulated and the triangular solves are done on column chunks of X
  converted to float64 one chunk at a time, so X may be float32 and very wide (e.g. 10,000 × 32,360):
  the extra memory is M (8N² bytes) plus two chunks of ``chunk_bytes``. O(N²n) time.

Both results are clipped to the interval [1/(H_ii), 1/λ] that holds exactly for any SPD H = F + λI
(Cauchy–Schwarz gives [H⁻¹]_ii ≥ 1/H_ii; F ⪰ 0 gives H⁻¹ ⪯ I/λ), which only matters when rounding
in 1 − ‖L⁻¹X_i‖² would otherwise produce a non-positive value.

The helpers :func:`hessian_matrix` and :func:`hessian_inverse` (dense, small blocks) are shared with
the greedy and brute-force solvers.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, _symmetrize_lower, spd_inverse, select_top

__all__ = [
    "WoodFisherSolver",
    "obs_scores",
    "hessian_inverse_diagonal",
    "hessian_matrix",
    "hessian_inverse",
    "DEFAULT_CHUNK_BYTES",
]

#: bytes of one float64 chunk of X columns/rows processed at a time (two such chunks may be alive)
DEFAULT_CHUNK_BYTES = 64 * 2**20

_METHODS = ("auto", "dense", "woodbury")


def _choose_method(problem: BlockProblem, method: str) -> str:
    if method not in _METHODS:
        raise invalid_option("method", "hessian_inverse_diagonal()", f"one of {', '.join(_METHODS)}", repr(method))
    if method == "auto":
        if problem.factor is not None and problem.factor.shape[0] < problem.n:
            return "woodbury"
        return "dense"
    if method == "woodbury" and problem.factor is None:
        # a dense Fisher has no thin factor; its eigen-factor is n×n, so Woodbury would gain nothing
        return "dense"
    return method


def hessian_matrix(problem: BlockProblem, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """H = XᵀX + λI, shape (n, n), float64, Fortran order. Forms an n×n matrix: small/medium blocks only.

    With a float32 factor the rows of X are converted to float64 a chunk at a time and accumulated by a
    symmetric rank-k update (BLAS syrk), so the float64 copy of X is never held whole.
    """
    n, lam = problem.n, problem.damping
    if problem.fisher is not None:
        H = np.array(problem.fisher, dtype=np.float64, order="F")
    else:
        X = problem.factor
        N = X.shape[0]
        H = np.zeros((n, n), dtype=np.float64, order="F")
        rows = max(1, int(chunk_bytes) // (8 * n))
        for r0 in range(0, N, rows):
            Xr = np.asarray(X[r0 : r0 + rows], dtype=np.float64)
            # H_lower += Xrᵀ Xr  (trans=1: C = α AᵀA + βC)
            H = blas.dsyrk(1.0, Xr, beta=1.0, c=H, trans=1, lower=1, overwrite_c=1)
        H = _symmetrize_lower(H)
    H[np.diag_indices(n)] += lam
    return H


def hessian_inverse(problem: BlockProblem, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """H⁻¹ = (XᵀX + λI)⁻¹, shape (n, n), float64, symmetric. Small/medium blocks only (n² memory).

    Rows of one layer (:meth:`~formulations.problem.BlockProblem.with_weights`) share one read-only H⁻¹,
    computed for the first row (callers that modify it copy it); a lone block computes its own each call,
    so no n×n matrix outlives the solve that needed it."""
    if problem.shares_rows:
        return problem.derived("hessian_inverse", lambda p: spd_inverse(hessian_matrix(p, chunk_bytes)), shared=True)
    return spd_inverse(hessian_matrix(problem, chunk_bytes))


def _woodbury_diagonal(problem: BlockProblem, chunk_bytes: int) -> np.ndarray:
    X, lam, n = problem.factor, problem.damping, problem.n
    N = X.shape[0]
    cols = max(1, int(chunk_bytes) // (8 * N))
    M = np.zeros((N, N), dtype=np.float64, order="F")
    col_norms = np.empty(n)
    for c0 in range(0, n, cols):
        Xc = np.array(X[:, c0 : c0 + cols], dtype=np.float64, order="F")
        col_norms[c0 : c0 + Xc.shape[1]] = np.einsum("ij,ij->j", Xc, Xc)
        # M_lower += Xc Xcᵀ  (trans=0: C = α AAᵀ + βC)
        M = blas.dsyrk(1.0, Xc, beta=1.0, c=M, trans=0, lower=1, overwrite_c=1)
    M[np.diag_indices(N)] += lam
    L, info = lapack.dpotrf(M, lower=1, clean=1, overwrite_a=1)
    whiten = None
    if info != 0:
        # M ⪰ λI in exact arithmetic; rounding broke Cholesky: use M⁻¹ = U Λ⁻¹ Uᵀ with Λ clipped at λ
        # dpotrf overwrote M part-way, so rebuild it (a rare path: twice the passes over X is acceptable)
        del L
        Mf = np.zeros((N, N))
        for c0 in range(0, n, cols):
            Xc = np.asarray(X[:, c0 : c0 + cols], dtype=np.float64)
            Mf += Xc @ Xc.T
        Mf[np.diag_indices(N)] += lam
        evals, evecs = np.linalg.eigh(Mf)
        whiten = (evecs / np.sqrt(np.clip(evals, lam, None))).T  # Λ^{-1/2} Uᵀ
        del Mf
    t = np.empty(n)
    for c0 in range(0, n, cols):
        Xc = np.array(X[:, c0 : c0 + cols], dtype=np.float64, order="F")
        if whiten is None:
            Z = scipy.linalg.solve_triangular(L, Xc, lower=True, overwrite_b=True, check_finite=False)
        else:
            Z = whiten @ Xc
        t[c0 : c0 + Xc.shape[1]] = np.einsum("ij,ij->j", Z, Z)
    diag = (1.0 - t) / lam
    return np.clip(diag, 1.0 / (col_norms + lam), 1.0 / lam)


def _dense_diagonal(problem: BlockProblem, chunk_bytes: int) -> np.ndarray:
    H = hessian_matrix(problem, chunk_bytes)
    h_diag = np.diag(H).copy()
    diag = np.diag(spd_inverse(H)).copy()
    return np.clip(diag, 1.0 / h_diag, 1.0 / problem.damping)


def hessian_inverse_diagonal(
    problem: BlockProblem, method: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> np.ndarray:
    """diag(H⁻¹), shape (n,), float64, H = XᵀX + λI (see the module docstring).

    Parameters
    ----------
    method : "auto" (woodbury when the factor has fewer rows than columns, else dense), "dense" or
        "woodbury" (falls back to dense when only a dense Fisher is held).
    chunk_bytes : size of the float64 chunks of X converted at a time (bounds the extra memory).
    """
    chosen = _choose_method(problem, method)
    if chosen == "woodbury":
        return _woodbury_diagonal(problem, chunk_bytes)
    return _dense_diagonal(problem, chunk_bytes)


def obs_scores(problem: BlockProblem, method: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """OBS saliencies ρ_i = w_i² / [H⁻¹]_ii, shape (n,), float64 (twice the loss increase of removing w_i
    alone with the others re-optimised). Comparable across blocks that share a loss, which is how a global
    budget by OBS score is set.

    diag(H⁻¹) depends on X, λ only (not on k nor g), so it is derived data of the problem
    (:meth:`~formulations.problem.BlockProblem.derived`): the budget, the solver and every
    :meth:`~formulations.problem.BlockProblem.with_n_keep` copy of one block compute it once."""
    key = ("hessian_inverse_diagonal", _choose_method(problem, method))
    diag = problem.derived(key, lambda p: hessian_inverse_diagonal(p, method, chunk_bytes), shared=True)
    return problem.weights**2 / diag


class WoodFisherSolver(SubsetSolver):
    """Keep the k largest OBS scores ρ_i = w_i²/[H⁻¹]_ii (one-shot, no interaction between removals).

    Parameters
    ----------
    method : "auto", "dense" or "woodbury": how diag(H⁻¹) is computed (module docstring).
    chunk_mb : float64 chunk size in MiB for the streamed passes over X (> 0).
    """

    name = "woodfisher"
    capabilities = Capabilities(
        patterns=True,
        description="Keep the k largest OBS scores w_i^2/[H^-1]_ii (WoodFisher; Woodbury when N < n).",
    )

    def __init__(self, method: str = "auto", chunk_mb: float = DEFAULT_CHUNK_BYTES / 2**20) -> None:
        if method not in _METHODS:
            raise invalid_option("method", "WoodFisherSolver()", f"one of {', '.join(_METHODS)}", repr(method))
        if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or not (
            np.isfinite(chunk_mb) and chunk_mb > 0
        ):
            raise invalid_option("chunk_mb", "WoodFisherSolver()", "a finite number > 0 (MiB)", repr(chunk_mb))
        self.method = method
        self.chunk_mb = float(chunk_mb)

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Top-k support of the OBS scores (per group under an N:M pattern); ``warm_start`` is ignored."""
        start = time.perf_counter()
        chunk_bytes = max(1, int(self.chunk_mb * 2**20))
        chosen = _choose_method(problem, self.method)
        scores = obs_scores(problem, chosen, chunk_bytes)
        support = select_top(problem, scores)
        return SolveResult(
            support=support,
            status=Status.FEASIBLE,
            termination=Termination.COMPLETED,
            wall_time=time.perf_counter() - start,
            iterations=1,
            solver=self.name,
            extra={"method": chosen},
        )
