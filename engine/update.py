"""The CBS-U update in torch, batched over blocks (agrees with ``formulations.objective.optimal_update``).

For each block (X (N, n), w (n,), λ, g, support S of size k) the kept weights solve

    (X_SᵀX_S + λI) v_S = X_Sᵀ y + λ w_S − g_S,     y = X w,

and E(S) = gᵀd + ½‖r‖² + (λ/2)‖d‖² with d = v − w, r = X d = X_S v_S − y.

Blocks with k ≤ N are stacked into one batched Cholesky solve: each k_b×k_b system is padded to the
group's largest k with an identity block and a zero right-hand side, which leaves the solution of the
real part unchanged and gives zeros on the padding. A block with k > N is solved alone by Woodbury
(an N×N Cholesky). Everything runs in float64; X may be stored in float32. A block whose Cholesky
fails or is too ill-conditioned (same test as the numpy reference) is handed to the numpy reference,
which falls back to an SVD solve and warns.

A large block whose gradients are float32 (min(N, k) ≥ ``formulations.objective.MIXED_MIN``) is solved by
the numpy reference's mixed-precision path: the Gram matrix in float32 preconditions conjugate gradients
on the float64 system, as accurate as the float64 Cholesky solve in half the time.

A support the numpy reference has just solved for the same block (a solver scoring its own answer) is
not solved again when the caller passes that block's ``formulations.objective.UpdateMemo`` (``memos``):
its solution is the reference's, and for the MLPNet whole block at sparsity 0.5 the second solve would
cost about a minute of one core. Blocks handed to the numpy reference (ill-conditioned, or large float32)
fill their memo.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack
import torch

from formulations import objective as obj
from formulations.problem import BlockProblem

__all__ = ["UpdateResult", "batched_update", "shared_factor_update", "DEFAULT_BATCH_BYTES"]

#: memory allowed for one stacked batch of X_S (float64) in bytes
DEFAULT_BATCH_BYTES = 512 * 2**20


@dataclass
class UpdateResult:
    """Update of one block: ``weights`` v (n,) float64 with v_P = 0, ``objective`` E(S), ``residual`` r (N,)."""

    weights: np.ndarray
    objective: float
    residual: np.ndarray
    method: str


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only) problem array; we never write to it, so the warning is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


def _finish(problem: BlockProblem, idx: np.ndarray, vS: torch.Tensor, XS: torch.Tensor, y: torch.Tensor, method: str) -> UpdateResult:
    v = np.zeros(problem.n)
    v[idx] = vS.numpy()
    r = (XS @ vS - y) if idx.size else -y
    d = v - problem.weights
    value = 0.5 * float(r @ r) + 0.5 * problem.damping * float(d @ d)
    if problem.gradient is not None:
        value += float(problem.gradient @ d)
    return UpdateResult(v, value, r.numpy(), method)


def _cholesky_ok(L: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(L, dim1=-2, dim2=-1).abs()
    dmin = d.min(dim=-1).values
    dmax = d.max(dim=-1).values
    return (info == 0) & (dmin > 0) & ((dmax / dmin.clamp_min(1e-300)) ** 2 <= obj.COND_LIMIT)


def _rhs(problem: BlockProblem, idx: np.ndarray, XS: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = _tensor(problem.weights)
    b = XS.T @ y + problem.damping * w[idx]
    if problem.gradient is not None:
        b = b - _tensor(problem.gradient)[idx]
    return b


def _gram_cholesky(XS: torch.Tensor, lam: float, outer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factor L of XSᵀXS + λI (k×k; ``outer`` False) or XS XSᵀ + λI (N×N; ``outer``
    True), float64, and LAPACK's ``info`` (0 = success), as ``torch.linalg.cholesky_ex`` returns them.

    The Gram matrix comes from BLAS syrk, which computes one triangle: half the flops of the general
    product, which dominates large updates (the MLPNet whole block at sparsity 0.5: N = 10,000,
    k = 16,180). LAPACK potrf factors that triangle in place, so no second N×N copy is made."""
    a = XS.numpy()  # (N, k), C order: seen by Fortran as the (k, N) matrix XSᵀ, so no copy is made
    # Fortran's view is B = XSᵀ; trans=0 gives B Bᵀ = XSᵀXS, trans=1 gives BᵀB = XS XSᵀ
    A = blas.dsyrk(1.0, a.T, trans=1 if outer else 0, lower=1)
    A[np.diag_indices_from(A)] += lam
    L, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)  # clean: zeros above the diagonal
    return torch.from_numpy(L), torch.tensor(info)


def _single(problem: BlockProblem, idx: np.ndarray, memo: obj.UpdateMemo | None = None) -> UpdateResult:
    if problem.factor_matrix().dtype == np.float32 and min(problem.n_samples, idx.size) >= obj.MIXED_MIN:
        # a large block of float32 gradients: the reference's mixed-precision solve (float32 Gram as the
        # preconditioner of CG on the float64 system) takes half the time of the float64 Gram below
        return _reference(problem, idx, memo)
    X = _tensor(problem.factor_matrix())
    y = _tensor(problem.target())  # derived data of the problem: repeated updates of one block reuse it
    if idx.size == 0:
        return _finish(problem, idx, torch.zeros(0, dtype=torch.float64), X[:, :0].to(torch.float64), y, "trivial")
    XS = X[:, torch.from_numpy(idx)].to(torch.float64)
    b = _rhs(problem, idx, XS, y)
    lam = problem.damping
    N, k = XS.shape
    if k <= N:
        L, info = _gram_cholesky(XS, lam, outer=False)
        method = "cholesky"
        if bool(_cholesky_ok(L, info)):
            return _finish(problem, idx, torch.cholesky_solve(b[:, None], L)[:, 0], XS, y, method)
    else:
        L, info = _gram_cholesky(XS, lam, outer=True)
        method = "woodbury"
        if bool(_cholesky_ok(L, info)):
            t = torch.cholesky_solve((XS @ b)[:, None], L)[:, 0]
            return _finish(problem, idx, (b - XS.T @ t) / lam, XS, y, method)
    return _reference(problem, idx, memo)


def _reference(problem: BlockProblem, idx: np.ndarray, memo: obj.UpdateMemo | None = None) -> UpdateResult:
    support = np.zeros(problem.n, dtype=bool)
    support[idx] = True
    sol = obj.optimal_update(problem, support, memo)  # ill-conditioned: it warns and uses the SVD solve
    return UpdateResult(sol.weights, sol.objective, sol.residual, sol.method)


def _batch(
    problems: list[BlockProblem], idxs: list[np.ndarray], memos: list[obj.UpdateMemo | None]
) -> list[UpdateResult]:
    """Padded batched Cholesky for blocks with the same N and k ≤ N."""
    kmax = max(i.size for i in idxs)
    B, N = len(problems), problems[0].n_samples
    XS = torch.zeros((B, N, kmax), dtype=torch.float64)
    rhs = torch.zeros((B, kmax), dtype=torch.float64)
    lam = torch.empty(B, dtype=torch.float64)
    ys = []
    for b, (p, idx) in enumerate(zip(problems, idxs)):
        X = _tensor(p.factor_matrix())
        y = _tensor(p.target())
        ys.append(y)
        xs = X[:, torch.from_numpy(idx)].to(torch.float64)
        XS[b, :, : idx.size] = xs
        rhs[b, : idx.size] = _rhs(p, idx, xs, y)
        lam[b] = p.damping
    A = XS.transpose(1, 2) @ XS
    A.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    pad = torch.arange(kmax)[None, :] >= torch.tensor([i.size for i in idxs])[:, None]
    # padded coordinates: A = I there (X columns are zero, so A = λ; make it 1 for a clean factor)
    A.diagonal(dim1=1, dim2=2)[pad] = 1.0
    L, info = torch.linalg.cholesky_ex(A)
    ok = _cholesky_ok(L, info)
    sol = torch.cholesky_solve(rhs[..., None], L)[..., 0]
    out = []
    for b, (p, idx) in enumerate(zip(problems, idxs)):
        if bool(ok[b]):
            k = idx.size
            out.append(_finish(p, idx, sol[b, :k].clone(), XS[b, :, :k], ys[b], "cholesky"))
        else:
            out.append(_reference(p, idx, memos[b]))
    return out


def batched_update(
    problems: list[BlockProblem],
    supports: list[np.ndarray],
    memos: list[obj.UpdateMemo | None] | None = None,
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> list[UpdateResult]:
    """The CBS-U update of every block, in the order given.

    Parameters
    ----------
    problems : blocks (factor form or dense fisher).
    supports : boolean masks (n_b,) or kept indices, one per block (any size ≤ n_b).
    memos : optional, one :class:`formulations.objective.UpdateMemo` (or None) per block: a support the
        block's memo holds is taken from it, not solved again (nothing is remembered without one).
    max_batch_bytes : memory allowed for one stacked batch of X_S in float64.
    """
    if len(problems) != len(supports):
        raise ValueError(
            f"The 'supports' argument of batched_update() must have one entry per problem ({len(problems)}). "
            f"Got {len(supports)}."
        )
    if memos is None:
        memos = [None] * len(problems)
    elif len(memos) != len(problems):
        raise ValueError(
            f"The 'memos' argument of batched_update() must be None or have one entry (an UpdateMemo or None) per "
            f"problem ({len(problems)}). Got {len(memos)}."
        )
    masks = [obj.as_support(p, s, check_size=False) for p, s in zip(problems, supports)]
    idxs = [np.flatnonzero(m) for m in masks]
    results: list[UpdateResult | None] = [None] * len(problems)
    # group the small systems (k ≤ N) by N so they can be stacked
    groups: dict[int, list[int]] = {}
    for i, (p, idx) in enumerate(zip(problems, idxs)):
        known = obj.remembered_update(p, masks[i], memos[i])
        if known is not None:  # a solver already solved this support exactly (the reference's own answer)
            results[i] = UpdateResult(known.weights, known.objective, known.residual, known.method)
        elif 0 < idx.size <= p.n_samples and p.n_samples * idx.size * 8 <= max_batch_bytes // 4:
            groups.setdefault(p.n_samples, []).append(i)
        else:
            results[i] = _single(p, idx, memos[i])
    for N, members in groups.items():
        members.sort(key=lambda i: idxs[i].size)  # similar k together: less padding
        batch: list[int] = []
        for i in members + [-1]:
            if i >= 0:
                kmax = max([idxs[j].size for j in batch] + [idxs[i].size])
                if not batch or (len(batch) + 1) * N * kmax * 8 <= max_batch_bytes:
                    batch.append(i)
                    continue
            if batch:
                parts = _batch([problems[j] for j in batch], [idxs[j] for j in batch], [memos[j] for j in batch])
                for j, r in zip(batch, parts):
                    results[j] = r
            batch = [i] if i >= 0 else []
    return results  # type: ignore[return-value]


def shared_factor_update(
    problems: list[BlockProblem],
    supports: list[np.ndarray],
    gram: np.ndarray,
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> list[UpdateResult]:
    """The CBS-U update of blocks that share one factor X (the rows of a layer), given G = XᵀX (n, n).

    Each block's system (G_SS + λI) v_S = (G w)_S + λ w_S − g_S is gathered from G, never formed from X_S
    (O(k²) per row instead of O(N k²)); rows with the same k are stacked into one batched Cholesky solve
    (at most ``max_batch_bytes`` of k×k systems at a time); r = X (v − w) for all rows by one product.
    A row whose Cholesky fails or is ill-conditioned goes to the numpy reference (which warns and uses
    SVD), as in :func:`batched_update`. Agrees with ``formulations.objective.optimal_update``.
    """
    if len(problems) != len(supports):
        raise ValueError(
            f"The 'supports' argument of shared_factor_update() must have one entry per problem "
            f"({len(problems)}). Got {len(supports)}."
        )
    if not problems:
        return []
    X = problems[0].factor_matrix()
    if any(p.factor_matrix() is not X for p in problems):
        raise ValueError("shared_factor_update() needs problems that share one factor array (BlockProblem.with_weights).")
    n = problems[0].n
    G = np.asarray(gram, dtype=np.float64)
    if G.shape != (n, n):
        raise ValueError(f"The 'gram' argument of shared_factor_update() must have shape ({n}, {n}). Got {G.shape}.")
    masks = [obj.as_support(p, s, check_size=False) for p, s in zip(problems, supports)]
    Gt = _tensor(G)
    W = torch.from_numpy(np.stack([p.weights for p in problems]))
    lam = torch.tensor([p.damping for p in problems], dtype=torch.float64)
    rhs_all = W @ Gt + lam[:, None] * W  # (G w + λ w) for every row; G is symmetric
    for b, p in enumerate(problems):
        if p.gradient is not None:
            rhs_all[b] -= _tensor(p.gradient)
    V = torch.zeros_like(W)
    failed: set[int] = set()
    by_k: dict[int, list[int]] = {}
    for b, m in enumerate(masks):
        by_k.setdefault(int(m.sum()), []).append(b)
    for k, members in by_k.items():
        if k == 0:
            continue
        step = max(1, max_batch_bytes // (8 * k * k))
        for s in range(0, len(members), step):
            rows = torch.tensor(members[s : s + step])
            idx = torch.from_numpy(np.stack([np.flatnonzero(masks[b]) for b in members[s : s + step]]))
            A = Gt[idx[:, :, None], idx[:, None, :]]
            A.diagonal(dim1=1, dim2=2).add_(lam[rows][:, None])
            L, info = torch.linalg.cholesky_ex(A)
            ok = _cholesky_ok(L, info)
            vS = torch.cholesky_solve(torch.gather(rhs_all[rows], 1, idx)[..., None], L)[..., 0]
            V[rows[:, None], idx] = vS
            failed.update(int(b) for b in rows[~ok])
    D = V - W
    R = D @ _tensor(X).to(torch.float64).T  # r = X d, (rows, N)
    values = 0.5 * (R * R).sum(1) + 0.5 * lam * (D * D).sum(1)
    out = []
    for b, p in enumerate(problems):
        if b in failed:
            out.append(_reference(p, np.flatnonzero(masks[b])))
            continue
        value = float(values[b])
        if p.gradient is not None:
            value += float(_tensor(p.gradient) @ D[b])
        out.append(UpdateResult(V[b].numpy().copy(), value, R[b].numpy().copy(), "cholesky" if masks[b].any() else "trivial"))
    return out
