"""The CBS-S binary QP's swap kernel: the state of one support and its exact O(N) swap moves.

With z ∈ {0,1}ⁿ (1 = kept), u = w ⊙ (1 − z) (n,), X (N, n) the factor and r = X u (N,),

    f(z) = ½‖r‖² + (λ/2)‖u‖² − gᵀu      (``formulations.objective.selection_objective``).

The restore gain a_p, the prune cost b_q, the swap change Δf(p, q) and the cost and precision of these
products are derived in the module docstring of :mod:`engine.solvers.local_search`, whose
:class:`~engine.solvers.local_search.CBSSolver` runs the search; its public names are re-exported there.
"""

from __future__ import annotations

import numpy as np

from formulations.problem import BlockProblem

__all__ = ["SelectionState", "column_major"]

#: rows of Xᵀ converted to float64 at once in chunked exact products (~40 MB at N = 10,000)
_CHUNK_ROWS = 512


def column_major(X: np.ndarray, block: int = 1024) -> np.ndarray:
    """Return Xᵀ (n, N) C-contiguous, same dtype, for X (N, n).

    A view when X is already Fortran-ordered; otherwise a blocked transpose (numpy's plain
    ``ascontiguousarray(X.T)`` walks memory with a stride of n and is ~10× slower at n = 32,360).
    """
    XT = X.T
    if XT.flags.c_contiguous:
        return XT
    N, n = X.shape
    out = np.empty((n, N), dtype=X.dtype)
    for r0 in range(0, N, block):
        for c0 in range(0, n, block):
            out[c0 : c0 + block, r0 : r0 + block] = X[r0 : r0 + block, c0 : c0 + block].T
    return out


def _exact_product_and_diag(XT: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r = X u (N,), diag F = ‖X_i‖² (n,)) in float64, in one sweep converting Xᵀ a chunk of rows at a time."""
    n, N = XT.shape
    r = np.zeros(N)
    diag = np.empty(n)
    for c in range(0, n, _CHUNK_ROWS):
        rows = XT[c : c + _CHUNK_ROWS].astype(np.float64, copy=False)
        r += rows.T @ u[c : c + _CHUNK_ROWS]
        diag[c : c + _CHUNK_ROWS] = np.einsum("ij,ij->i", rows, rows)
    return r, diag


class SelectionState:
    """The CBS-S state of one support: z (kept mask), r = X u (float64), for exact O(N) swap moves.

    Parameters
    ----------
    problem : the block.
    support : (n,) bool, True = kept (any size; the solver keeps it at k).
    columns : Xᵀ (n, N) C-contiguous (see :func:`column_major`); computed from the problem if None.

    All quantities follow the module docstring of :mod:`engine.solvers.local_search`: f = ½‖r‖² + (λ/2)‖u‖² − gᵀu, u = w ⊙ (1 − z).
    """

    def __init__(self, problem: BlockProblem, support: np.ndarray, columns: np.ndarray | None = None) -> None:
        self.problem = problem
        self.columns = column_major(problem.factor_matrix()) if columns is None else columns
        self.w = problem.weights
        self.lam = problem.damping
        self.g = problem.gradient
        self.kept = np.asarray(support, dtype=bool).copy()
        #: r = X u (N,) float64, updated in O(N) by :meth:`swap`; diag F (n,) float64
        self.r, self.diag = _exact_product_and_diag(self.columns, self.pruned_part())

    # -- values
    def pruned_part(self) -> np.ndarray:
        """u = w ⊙ (1 − z) (n,) float64."""
        return np.where(self.kept, 0.0, self.w)

    def objective(self) -> float:
        """f(z) = ½‖r‖² + (λ/2)‖u‖² − gᵀu (the selection objective), O(N + n)."""
        u = self.pruned_part()
        value = 0.5 * float(self.r @ self.r) + 0.5 * self.lam * float(u @ u)
        if self.g is not None:
            value -= float(self.g @ u)
        return value

    def column(self, i: int) -> np.ndarray:
        """X_i (N,) float64 (exact copy of the stored column)."""
        return self.columns[i].astype(np.float64)

    def restore_gain(self, p: int, xp: np.ndarray | None = None) -> float:
        """a_p = w_p s_p − ½ d_p w_p² + (λ/2) w_p² − g_p w_p for a pruned p (float64, exact)."""
        xp = self.column(p) if xp is None else xp
        wp = self.w[p]
        a = wp * float(xp @ self.r) - 0.5 * float(xp @ xp) * wp * wp + 0.5 * self.lam * wp * wp
        return a - (self.g[p] * wp if self.g is not None else 0.0)

    def prune_cost(self, q: int, xq: np.ndarray | None = None) -> float:
        """b_q = w_q s_q + ½ (d_q + λ) w_q² − g_q w_q for a kept q (float64, exact)."""
        xq = self.column(q) if xq is None else xq
        wq = self.w[q]
        b = wq * float(xq @ self.r) + 0.5 * (float(xq @ xq) + self.lam) * wq * wq
        return b - (self.g[q] * wq if self.g is not None else 0.0)

    def swap_gain(self, p: int, q: int) -> float:
        """−Δf of restoring pruned p and pruning kept q: a_p − b_q + w_p w_q F_pq (float64, exact)."""
        if self.kept[p] or not self.kept[q]:
            raise ValueError(
                f"swap_gain needs p pruned and q kept; got p={p} (kept={self.kept[p]}), q={q} (kept={self.kept[q]})."
            )
        xp, xq = self.column(p), self.column(q)
        return self.restore_gain(p, xp) - self.prune_cost(q, xq) + self.w[p] * self.w[q] * float(xp @ xq)

    def swap(self, p: int, q: int, xp: np.ndarray | None = None, xq: np.ndarray | None = None) -> None:
        """Restore p, prune q: z_p = 1, z_q = 0, r += w_q X_q − w_p X_p (O(N))."""
        xp = self.column(p) if xp is None else xp
        xq = self.column(q) if xq is None else xq
        self.r += self.w[q] * xq - self.w[p] * xp
        self.kept[p] = True
        self.kept[q] = False

    def ordering_scores(self, p0: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(s, F_{:, p0}) for all n weights in one product Xᵀ[r, X_p0], in the stored dtype.

        Only used to *order* candidates, so float32 is enough when X is float32.
        """
        XT = self.columns
        rhs = np.empty((XT.shape[1], 1 if p0 is None else 2), dtype=XT.dtype)
        rhs[:, 0] = self.r
        if p0 is not None:
            rhs[:, 1] = XT[p0]
        out = (XT @ rhs).astype(np.float64)
        return out[:, 0], (out[:, 1] if p0 is not None else None)


def _selection_objectives(problem: BlockProblem, XT: np.ndarray, masks: list[np.ndarray]) -> list[float]:
    """f(z) for several masks with one product R = X U, U = (n, B) pruned parts, in Xᵀ's dtype."""
    w, lam, g = problem.weights, problem.damping, problem.gradient
    U = np.stack([np.where(mask, 0.0, w) for mask in masks], axis=1)  # (n, B) float64
    R = (XT.T @ U.astype(XT.dtype, copy=False)).astype(np.float64)  # (N, B)
    values = 0.5 * np.einsum("ij,ij->j", R, R) + 0.5 * lam * np.einsum("ij,ij->j", U, U)
    if g is not None:
        values -= g @ U
    return [float(v) for v in values]
