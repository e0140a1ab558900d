"""The block problem: the data of one combinatorial OBS instance (DESIGN.md §1).

A block is a set of ``n`` weights ``w`` (float64, shape ``(n,)``) with a local quadratic model of the
loss built from ``N`` per-sample gradient rows ``G`` (shape ``(N, n)``):

    X = G / sqrt(N)                      (the *factor*, shape (N, n); F = XᵀX is the empirical Fisher)
    H = F + λ I                          (λ > 0: the *damping*)
    q(v) = gᵀ(v − w) + ½ (v − w)ᵀ H (v − w)
         = gᵀ(v − w) + ½ ‖X v − y‖² + (λ/2) ‖v − w‖²,      y = X w.

The problem is to keep ``k`` weights (``n_keep``) so that the loss after the best update of the kept
weights, ``E(S) = min {q(v) : v_P = 0}``, is smallest.

A problem holds either the factor ``X`` (preferred: it never needs an n×n matrix) or a dense,
symmetric positive semi-definite ``fisher`` matrix ``F`` (n×n), never both. ``g`` (``gradient``) is
optional and off by default, as in CBS.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import InvalidProblemError, invalid_argument

__all__ = ["BlockProblem", "eigen_factor"]

_T = TypeVar("_T")

#: columns converted to float64 at a time by matvec / rmatvec (N · 2048 · 8 bytes)
_CHUNK = 2048


def _fail(argument: str, allowed: str, got: Any) -> InvalidProblemError:
    return invalid_argument(InvalidProblemError, argument, "BlockProblem", allowed, got)


def _describe(a: np.ndarray) -> str:
    return f"an array of shape {a.shape} and dtype {a.dtype}"


@dataclass(frozen=True, eq=False)
class BlockProblem:
    """One combinatorial OBS instance, validated on construction and immutable afterwards.

    Attributes
    ----------
    weights : (n,) float64
        The trained weights ``w`` of the block.
    n_keep : int
        ``k``, the number of weights to keep, ``0 <= k <= n``.
    damping : float
        Absolute damping ``λ > 0`` added to the Fisher (H = F + λI).
    factor : (N, n) float32 or float64, optional
        ``X = G/√N``. float32 is accepted to halve memory on large blocks; every reduction that
        decides a result is carried out in float64.
    fisher : (n, n) float64, optional
        Dense ``F`` (symmetric PSD), the alternative to ``factor`` for small blocks.
    gradient : (n,) float64, optional
        Mean gradient ``g``; ``None`` means g = 0 (the CBS convention).
    label : str
        Free text carried into records (e.g. ``"fc2[3]"``).
    pattern : (N, M), optional
        N:M sparsity: in every group of M consecutive weights exactly N are kept (``n`` divisible by M,
        ``n_keep = n/M · N``); see :mod:`formulations.patterns`. None: unstructured.

    Derived data
    ------------
    A problem holds no mutable state that changes a result. Quantities that are pure functions of the
    block's data and independent of ``k`` and ``g`` (y = Xw, the factor of a dense Fisher, diag(H⁻¹)) are
    computed lazily, once, by :meth:`derived` and kept in a private slot that is not a constructor
    argument, is not compared and not shown; :meth:`with_n_keep` and :meth:`with_gradient` share it.
    Memos of solves (which depend on the caller's work, not only on the data) are never kept here: see
    ``formulations.objective.UpdateMemo``, which the caller owns.

    Rows of one layer (the layer-wise objective) are blocks that differ only in ``w``: :meth:`with_weights`
    makes them from one problem, sharing the factor and a second slot, ``derived(..., shared=True)``, for
    quantities that depend on neither ``w``, ``k`` nor ``g`` (H⁻¹, diag(H⁻¹)): computed once per layer,
    never once per row.
    """

    weights: np.ndarray
    n_keep: int
    damping: float
    factor: np.ndarray | None = None
    fisher: np.ndarray | None = None
    gradient: np.ndarray | None = None
    label: str = ""
    pattern: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # the derived-data slot (see the class docstring): not a field, so not a constructor argument
        object.__setattr__(self, "_derived", {})
        object.__setattr__(self, "_shared", None)  # a dict once with_weights shares it (class docstring)
        w = np.asarray(self.weights)
        if w.ndim != 1 or w.size == 0:
            raise _fail("weights", "a non-empty 1-D array", _describe(w))
        w = w.astype(np.float64, copy=True)
        if not np.all(np.isfinite(w)):
            raise _fail("weights", "finite", "an array with NaN or inf")
        n = w.size
        object.__setattr__(self, "weights", w)

        k = self.n_keep
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise _fail("n_keep", f"an integer in [0, {n}]", repr(k))
        if not 0 <= int(k) <= n:
            raise _fail("n_keep", f"in [0, {n}] (n = number of weights)", k)
        object.__setattr__(self, "n_keep", int(k))

        lam = self.damping
        if isinstance(lam, (bool, np.bool_)):
            raise _fail("damping", "a finite number > 0", repr(lam))
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise _fail("damping", "a positive number", repr(lam)) from None
        if not (np.isfinite(lam) and lam > 0):
            raise _fail("damping", "a finite number > 0", lam)
        object.__setattr__(self, "damping", lam)

        if (self.factor is None) == (self.fisher is None):
            raise InvalidProblemError(
                "BlockProblem needs exactly one of 'factor' (X, shape (N, n)) and 'fisher' (F, shape (n, n)). "
                f"Got factor={'None' if self.factor is None else 'an array'}, "
                f"fisher={'None' if self.fisher is None else 'an array'}."
            )
        if self.factor is not None:
            X = np.asarray(self.factor)
            if X.dtype not in (np.float32, np.float64):
                X = X.astype(np.float64)
            if X.ndim != 2 or X.shape[1] != n or X.shape[0] < 1:
                raise _fail("factor", f"a 2-D array of shape (N, {n}) with N >= 1", _describe(X))
            if not np.all(np.isfinite(X)):
                raise _fail("factor", "finite", "an array with NaN or inf")
            X.setflags(write=False)
            object.__setattr__(self, "factor", X)
        else:
            F = np.asarray(self.fisher, dtype=np.float64)
            if F.shape != (n, n):
                raise _fail("fisher", f"a square array of shape ({n}, {n})", _describe(F))
            if not np.all(np.isfinite(F)):
                raise _fail("fisher", "finite", "an array with NaN or inf")
            scale = max(1.0, float(np.abs(F).max()))
            if not np.allclose(F, F.T, rtol=0, atol=1e-10 * scale):
                raise _fail("fisher", "symmetric", "an asymmetric matrix")
            F = (F + F.T) / 2
            F.setflags(write=False)
            object.__setattr__(self, "fisher", F)

        if self.gradient is not None:
            g = np.asarray(self.gradient, dtype=np.float64).copy()
            if g.shape != (n,):
                raise _fail("gradient", f"None or an array of shape ({n},)", _describe(g))
            if not np.all(np.isfinite(g)):
                raise _fail("gradient", "finite", "an array with NaN or inf")
            g.setflags(write=False)
            object.__setattr__(self, "gradient", g)
        self.weights.setflags(write=False)
        if self.pattern is not None:
            from .patterns import check_pattern

            object.__setattr__(self, "pattern", check_pattern(self.pattern, n, self.n_keep))

    # ------------------------------------------------------------------ sizes
    @property
    def n(self) -> int:
        """Number of weights in the block."""
        return self.weights.size

    @property
    def n_prune(self) -> int:
        """``n − k``, the number of weights to remove."""
        return self.n - self.n_keep

    @property
    def n_samples(self) -> int:
        """Rows of the factor ``N`` (``n`` when only a dense Fisher is held)."""
        return self.factor.shape[0] if self.factor is not None else self.n

    def with_n_keep(self, n_keep: int, pattern: tuple[int, int] | None | str = "same") -> "BlockProblem":
        """The same block with another budget (and, when given, another ``pattern``: None for unstructured):
        shares the (read-only) arrays, the gradient object included, and the derived data, none of which
        depends on k (y = Xw, factors, diag(H⁻¹)); no copy."""
        pattern = self.pattern if isinstance(pattern, str) and pattern == "same" else pattern
        other = BlockProblem(self.weights, n_keep, self.damping, self.factor, self.fisher, self.gradient, self.label,
                             pattern)
        return self._sharing(other, gradient=True)

    def with_gradient(self, gradient: np.ndarray | None) -> "BlockProblem":
        """The same block with another mean gradient ``g`` (``None``: g = 0); shares the arrays and the
        derived data, none of which depends on g."""
        other = BlockProblem(self.weights, self.n_keep, self.damping, self.factor, self.fisher, gradient, self.label,
                             self.pattern)
        return self._sharing(other, gradient=False)

    @property
    def shares_rows(self) -> bool:
        """Whether this block shares weight-independent derived data with other rows (:meth:`with_weights`)."""
        return self._shared is not None

    def with_weights(self, weights: np.ndarray, label: str = "") -> "BlockProblem":
        """The same block (factor or Fisher, λ, k, pattern; g = 0) for other weights ``w`` (n,), e.g. another
        row of the same layer. The factor is not validated or copied again, and the weight-independent
        derived data (``derived(..., shared=True)``) is shared with this problem and its other rows."""
        w = np.asarray(weights)
        if w.shape != (self.n,):
            raise _fail("weights", f"an array of shape ({self.n},) (the block's size)", _describe(w))
        w = w.astype(np.float64, copy=True)
        if not np.all(np.isfinite(w)):
            raise _fail("weights", "finite", "an array with NaN or inf")
        w.setflags(write=False)
        if self._shared is None:
            object.__setattr__(self, "_shared", {})
        other = copy.copy(self)
        for name, value in (("weights", w), ("gradient", None), ("label", str(label)), ("_derived", {})):
            object.__setattr__(other, name, value)
        return other

    def _sharing(self, other: "BlockProblem", gradient: bool) -> "BlockProblem":
        """``other`` (validated, equal data) made to hold this problem's very arrays and derived data."""
        names = ("weights", "factor", "fisher") + (("gradient",) if gradient else ())
        for name in names:
            object.__setattr__(other, name, getattr(self, name))
        object.__setattr__(other, "_derived", self._derived)
        object.__setattr__(other, "_shared", self._shared)
        return other

    # ----------------------------------------------------------- derived data
    def derived(self, key: Any, compute: Callable[["BlockProblem"], _T], shared: bool = False) -> _T:
        """The derived quantity ``key``: ``compute(self)`` the first time, the same object afterwards
        (arrays are made read-only).

        Only for pure functions of the block's data that depend neither on ``n_keep`` nor on
        ``gradient`` (the slot is shared by :meth:`with_n_keep` and :meth:`with_gradient`), e.g. y = Xw or
        diag(H⁻¹) for a given method. Never for results of a search or a solve.

        ``shared``: the quantity does not depend on ``w`` either; it is kept in the slot that
        :meth:`with_weights` shares between rows (in this problem's own slot when it has none)."""
        store = self._shared if shared and self._shared is not None else self._derived
        if key not in store:
            value = compute(self)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            store[key] = value
        return store[key]

    def has_derived(self, key: Any, shared: bool = False) -> bool:
        """Whether :meth:`derived` already holds ``key`` (so asking for it costs nothing)."""
        store = self._shared if shared and self._shared is not None else self._derived
        return key in store

    def factor_matrix(self) -> np.ndarray:
        """``X`` with ``XᵀX = F`` (float64 view or float32 array as stored).

        When only ``fisher`` is held, ``X = Λ^{1/2} Uᵀ`` from ``F = U Λ Uᵀ`` (eigenvalues clipped at 0),
        shape (n, n), computed once (derived data).
        """
        if self.factor is not None:
            return self.factor
        return self.derived("factor", _eigen_factor)

    def fisher_diagonal(self) -> np.ndarray:
        """``diag F`` (n,), float64."""
        if self.fisher is not None:
            return np.diag(self.fisher).copy()
        X = self.factor
        return np.einsum("ij,ij->j", X, X, dtype=np.float64)

    def fisher_columns(self, index: np.ndarray) -> np.ndarray:
        """``F[:, index]`` (n, len(index)), float64, without forming F."""
        index = np.asarray(index, dtype=np.intp)
        if self.fisher is not None:
            return self.fisher[:, index]
        X = self.factor
        return (X.T @ X[:, index]).astype(np.float64)

    def dense_fisher(self) -> np.ndarray:
        """``F`` (n, n) float64. Forms an n×n matrix: only for small blocks."""
        if self.fisher is not None:
            return self.fisher
        X = self.factor.astype(np.float64)
        return X.T @ X

    def dense_hessian(self) -> np.ndarray:
        """``H = F + λI`` (n, n) float64. Only for small blocks."""
        return self.dense_fisher() + self.damping * np.eye(self.n)

    def target(self) -> np.ndarray:
        """``y = X w`` (N,), float64, computed once (derived data)."""
        return self.derived("target", lambda p: p.matvec(p.weights))

    def matvec(self, d: np.ndarray) -> np.ndarray:
        """``X d`` (N,) in float64, by column chunks so a float32 X is never copied whole."""
        X = self.factor_matrix()
        d = np.asarray(d, dtype=np.float64)
        if X.dtype == np.float64:
            return X @ d
        out = np.zeros(X.shape[0])
        for s in range(0, X.shape[1], _CHUNK):
            out += X[:, s : s + _CHUNK].astype(np.float64) @ d[s : s + _CHUNK]
        return out

    def rmatvec(self, a: np.ndarray) -> np.ndarray:
        """``Xᵀ a`` (n,) in float64, by column chunks (exact to float64 even when X is float32)."""
        X = self.factor_matrix()
        a = np.asarray(a, dtype=np.float64)
        if X.dtype == np.float64:
            return X.T @ a
        out = np.empty(X.shape[1])
        for s in range(0, X.shape[1], _CHUNK):
            out[s : s + _CHUNK] = X[:, s : s + _CHUNK].T.astype(np.float64) @ a
        return out

    @classmethod
    def from_gradients(
        cls,
        gradients: np.ndarray,
        weights: np.ndarray,
        n_keep: int,
        damping: float,
        relative_damping: bool = False,
        gradient: np.ndarray | None = None,
        label: str = "",
        dtype: type = np.float64,
    ) -> "BlockProblem":
        """Build a problem from per-sample gradient rows ``G`` (N, n): ``X = G/√N``.

        With ``relative_damping``, ``λ = damping · mean(diag F)`` (falls back to ``damping`` when the
        Fisher is zero).
        """
        G = np.asarray(gradients)
        if G.ndim != 2 or G.shape[0] < 1:
            raise InvalidProblemError(
                f"The 'gradients' argument of BlockProblem.from_gradients must be a 2-D array (N, n) with N >= 1. "
                f"Got {_describe(G)}."
            )
        X = (G / np.sqrt(G.shape[0])).astype(dtype, copy=False)
        lam = float(damping)
        if relative_damping:
            mean_diag = float(np.einsum("ij,ij->", X, X, dtype=np.float64)) / X.shape[1]
            lam = lam * mean_diag if mean_diag > 0 else lam
        return cls(weights, n_keep, lam, factor=X, gradient=gradient, label=label)


def eigen_factor(F: np.ndarray) -> np.ndarray:
    """``X = Λ^{1/2} Uᵀ`` (n, n) with ``XᵀX = F`` from ``F = U Λ Uᵀ`` (symmetric PSD; eigenvalues clipped at 0)."""
    evals, evecs = np.linalg.eigh(F)
    return np.sqrt(np.clip(evals, 0.0, None))[:, None] * evecs.T


def _eigen_factor(problem: BlockProblem) -> np.ndarray:
    return eigen_factor(problem.fisher)
