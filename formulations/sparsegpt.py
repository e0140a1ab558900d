"""SparseGPT (Frantar & Alistarh, ICML 2023), Algorithm 1, in numpy float64: a whole layer at once.

For a layer W (d_out × d_in) with the Hessian of its reconstruction objective H = AᵀA/T + λI (shared by all
rows), SparseGPT visits the columns in order. Before each group of ``mask_block`` columns it chooses the mask
of that group adaptively, from the *current* (already updated) weights, by the OBS score w_c² / [H⁻¹]_cc²
where H⁻¹ is the upper Cholesky factor of the inverse (its diagonal entries play the role of √[H⁻¹]_cc of the
remaining columns). It then prunes column j (the masked rows of it), and spreads the error
e = w_j / [H⁻¹]_jj over the columns to its right: W[:, j:] −= e · H⁻¹[j, j:]. The spread is lazy: inside a
block of ``block`` (128) columns it is applied immediately, to the columns after the block once per block.

* :func:`sparsegpt` is the implementation with lazy batched updates (as the reference code runs it).
* :func:`sparsegpt_reference` is the direct transcription that applies every update at once to all columns
  on the right, the slow oracle the tests compare against (the two are equal up to rounding).

The mask rule per group of columns is the reference code's: unstructured, the ``sparsity`` fraction of the
group's d_out × mask_block scores that are smallest is pruned (ties at the threshold pruned too), so rows get
different budgets; with an N:M pattern, in every row the M − N smallest scores of each group of M.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .errors import InvalidProblemError

__all__ = ["sparsegpt", "sparsegpt_reference", "upper_inverse_factor"]


def upper_inverse_factor(H: np.ndarray) -> np.ndarray:
    """U upper triangular with UᵀU = H⁻¹ (the reference code's ``cholesky(cholesky_inverse(chol(H)),
    upper=True)``). H must be symmetric positive definite (damped)."""
    try:
        L = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        raise InvalidProblemError("sparsegpt(): H + λI is not positive definite; raise the damping.") from None
    Linv = scipy.linalg.solve_triangular(L, np.eye(H.shape[0]), lower=True)
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T


def _check(W: np.ndarray, H: np.ndarray, sparsity: float, pattern: tuple[int, int] | None, block: int,
           mask_block: int) -> None:
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise InvalidProblemError(f"sparsegpt(): W must be (d_out, d_in) and H (d_in, d_in). Got {W.shape}, {H.shape}.")
    if pattern is None and not 0 <= sparsity < 1:
        raise InvalidProblemError(f"sparsegpt(): sparsity must be in [0, 1). Got {sparsity}.")
    if pattern is not None and W.shape[1] % pattern[1]:
        raise InvalidProblemError(f"sparsegpt(): M = {pattern[1]} must divide d_in = {W.shape[1]}.")
    if block < 1 or mask_block < 1 or block % mask_block:
        raise InvalidProblemError(f"sparsegpt(): block sizes must be >= 1 with mask_block dividing block. Got "
                                  f"{block}, {mask_block}.")


def _group_mask(Wg: np.ndarray, diag: np.ndarray, sparsity: float) -> np.ndarray:
    """Pruned entries (True) of a group of columns: the scores w²/d² at or below the reference's threshold."""
    scores = Wg ** 2 / diag[None, :] ** 2
    if sparsity == 0:
        return np.zeros_like(scores, dtype=bool)
    return scores <= np.sort(scores.reshape(-1))[int(scores.size * sparsity)]  # sparsity < 1: in range


def _nm_mask(Wg: np.ndarray, diag: np.ndarray, pattern: tuple[int, int]) -> np.ndarray:
    """Pruned entries (True) of one group of M columns: the M − N smallest scores of every row."""
    N, M = pattern
    scores = Wg ** 2 / diag[None, :] ** 2
    order = np.argsort(scores, axis=1, kind="stable")[:, : M - N]
    mask = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def sparsegpt(W: np.ndarray, H: np.ndarray, sparsity: float = 0.5, pattern: tuple[int, int] | None = None,
              block: int = 128, mask_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on layer ``W`` (d_out, d_in) with damped Hessian ``H`` (d_in, d_in), float64.

    ``block``: columns per lazy batch (B = 128 in the paper). ``mask_block``: columns per adaptive mask
    choice (B_s; default ``block`` unstructured, M with a pattern); it must divide ``block``.
    Returns (the pruned and updated weights (d_out, d_in), the kept mask (d_out, d_in) bool)."""
    mask_block = (pattern[1] if pattern is not None else block) if mask_block is None else mask_block
    _check(W, H, sparsity, pattern, block, mask_block)
    W = np.array(W, dtype=np.float64)
    U = upper_inverse_factor(np.asarray(H, dtype=np.float64))
    d_in = W.shape[1]
    pruned = np.zeros_like(W, dtype=bool)
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if i % mask_block == 0:  # adaptive: from the weights as updated so far
                g = min(i + mask_block, i2 - i1)
                diag = np.diag(U1)[i:g]
                pruned[:, j : i1 + g] = (_group_mask(W1[:, i:g], diag, sparsity) if pattern is None
                                         else _nm_mask(W1[:, i:g], diag, pattern))
            w = W1[:, i]
            q = np.where(pruned[:, j], 0.0, w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])  # inside the block: at once
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # after the block: one lazy batch update
    return W, ~pruned


def sparsegpt_reference(W: np.ndarray, H: np.ndarray, sparsity: float = 0.5, pattern: tuple[int, int] | None = None,
                        mask_block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The direct transcription: every column's error is spread over all the columns to its right at once
    (no lazy batches). Same returns as :func:`sparsegpt`."""
    if pattern is not None:
        mask_block = pattern[1]
    _check(W, H, sparsity, pattern, mask_block, mask_block)
    W = np.array(W, dtype=np.float64)
    U = upper_inverse_factor(np.asarray(H, dtype=np.float64))
    d_in = W.shape[1]
    pruned = np.zeros_like(W, dtype=bool)
    for j in range(d_in):
        if j % mask_block == 0:
            g2 = min(j + mask_block, d_in)
            diag = np.diag(U)[j:g2]
            pruned[:, j:g2] = (_group_mask(W[:, j:g2], diag, sparsity) if pattern is None
                               else _nm_mask(W[:, j:g2], diag, pattern))
        w = W[:, j].copy()
        q = np.where(pruned[:, j], 0.0, w)
        err = (w - q) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
        W[:, j] = q
    return W, ~pruned
