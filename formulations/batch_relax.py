"""The perspective relaxation of many subproblems at once (the batched form of ``cuts.solve_perspective``).

Branch and bound bounds thousands of small subproblems (m ≤ a few hundred free coordinates). One FISTA
iteration of :func:`formulations.cuts.solve_perspective` is some fifty numpy calls on m-vectors, so for small
m its cost is the interpreter's, not the arithmetic's. Here B subproblems share every call: each is padded
to the largest m with inert coordinates (w = b = 0 and H = δI there, so the padded v stays 0, its score c is
0 and its z is 0: they change neither the bound nor the relaxation), and each row keeps its own δ, step, k,
momentum, restart and stopping test. A row that stops leaves the batch; the batch ends when every row has.

The iteration, the bound read at every iterate (LB(d) = base − sum of the k largest c_i) and the stopping rules
are those of ``solve_perspective`` (see its docstring), row by row; results are the same up to rounding.
Shapes: B rows, M = max m; arrays (B, M) unless said.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .cuts import DenseSubproblem, RelaxationResult

__all__ = ["solve_perspective_batch", "prox_k_support_rows", "prox_k_support_rows_warm", "top_k_sums"]


def top_k_sums(c: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B,) the sum of the k_b largest entries of each row of c (B, M); k_b ≥ 0."""
    srt = -np.sort(-c, axis=1)
    cs = np.concatenate([np.zeros((c.shape[0], 1)), np.cumsum(srt, axis=1)], axis=1)
    return cs[np.arange(c.shape[0]), np.minimum(k, c.shape[1])]


def prox_k_support_rows(x: np.ndarray, k: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, ``formulations.ksupport.prox_k_support`` (x (B, M), k (B,) ≥ 1, γ (B,) > 0): the same sweep
    over the 2M sorted breakpoints of Σ_i clip(√γ μ |x_i| − 2γ, 0, 1), vectorised across rows. Zero entries
    (padding) never enter: their breakpoints are +∞."""
    B, M = x.shape
    a = np.abs(x)
    nz = a > 0
    n_nz = nz.sum(axis=1)
    two_g = (2.0 * gamma)[:, None]
    sg = np.sqrt(gamma)[:, None]
    few = n_nz <= k  # keep every nonzero: z = 1 there
    with np.errstate(divide="ignore"):
        inv = np.where(nz, 1.0 / (sg * a), np.inf)
    t = np.concatenate([two_g * inv, (1.0 + two_g) * inv], axis=1)
    order = np.argsort(t, axis=1, kind="stable")
    t = np.take_along_axis(t, order, axis=1)
    is_hi = order >= M
    bb = np.take_along_axis(sg * a, order % M, axis=1)
    slope = np.cumsum(np.where(is_hi, -bb, bb), axis=1)
    active = np.cumsum(np.where(is_hi, -1.0, 1.0), axis=1)
    sat = np.cumsum(is_hi, axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        h = sat + slope * t - two_g * active
    h = np.where(np.isfinite(t), h, np.inf)
    j = np.clip((h < k[:, None]).sum(axis=1), 1, 2 * M - 1)
    rows = np.arange(B)
    s_prev = slope[rows, j - 1]
    t_prev, t_j = t[rows, j - 1], t[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = (k - sat[rows, j - 1] + two_g[:, 0] * active[rows, j - 1]) / s_prev
    mu = np.where(s_prev > 0, np.minimum(np.maximum(mu, t_prev), t_j), t_j)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    z = np.minimum(np.maximum((sg * mu[:, None]) * a - two_g, 0.0), 1.0)
    z = np.where(few[:, None], nz.astype(np.float64), z)
    v = np.where(few[:, None], x / (1.0 + two_g), x * z / (z + two_g))
    return v, z


def prox_k_support_rows_warm(x: np.ndarray, k: np.ndarray, gamma: np.ndarray,
                             mu0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`prox_k_support_rows` from guesses ``mu0`` (B,) of each row's multiplier (NaN: none), the batched
    ``formulations.ksupport.prox_k_support_warm``: Newton steps on the piecewise-linear Σ_i z_i(μ) = k for
    every row at once (at most 4), the exact sweep for the rows left. Returns (v, z, μ)."""
    a = np.abs(x)
    sgam = np.sqrt(gamma)[:, None]
    b = sgam * a
    two_g = (2.0 * gamma)[:, None]
    mu = mu0.copy()
    ok = np.isfinite(mu) & (mu > 0) & ((a > 0).sum(axis=1) > k)
    z = np.zeros_like(x)
    if ok.any():
        rows = np.flatnonzero(ok)
        bb, tg, kk, mm = b[rows], two_g[rows], k[rows], mu[rows]
        solved = np.zeros(rows.size, dtype=bool)
        for _ in range(4):
            zz = np.minimum(np.maximum(bb * mm[:, None] - tg, 0.0), 1.0)
            miss = kk - zz.sum(axis=1)
            hit = np.abs(miss) <= 1e-12 * kk
            z[rows[hit & ~solved]] = zz[hit & ~solved]
            solved |= hit
            if solved.all():
                break
            slope = np.where((zz > 0.0) & (zz < 1.0), bb, 0.0).sum(axis=1)
            step = np.divide(miss, slope, out=np.zeros_like(miss), where=slope > 0)
            mm = np.where(solved, mm, mm + step)
            solved |= (slope <= 0) & ~hit  # stuck: leave it to the sweep below (marked by NaN)
            mm = np.where((slope <= 0) & ~hit, np.nan, mm)
        mu[rows] = mm
        ok[rows[~solved | ~np.isfinite(mm)]] = False
    rest = np.flatnonzero(~ok)
    if rest.size:
        v_r, z_r = prox_k_support_rows(x[rest], k[rest], gamma[rest])
        z[rest] = z_r
        act = (z_r > 0.0) & (z_r < 1.0)
        # μ of each row from one active coordinate (z = √γ μ a − 2γ there), for the next call
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = np.where(act, (z_r + two_g[rest]) / b[rest], np.nan)
        mu[rest] = np.where(act.any(axis=1), np.nanmax(np.where(act, cand, -np.inf), axis=1), np.nan)
    few = (a > 0).sum(axis=1) <= k
    v = np.where(few[:, None], x / (1.0 + two_g), x * z / (z + two_g))
    return v, z, mu


def solve_perspective_batch(
    subs: Sequence[DenseSubproblem],
    deltas: Sequence[float],
    lipschitz: Sequence[float],
    v0s: Sequence[np.ndarray | None],
    upper: float = math.inf,
    max_iter: int = 300,
    rtol: float = 1e-7,
    check_every: int = 4,
) -> list[RelaxationResult]:
    """``solve_perspective`` for every subproblem (each with 0 < k' < m), all at once (module docstring).
    ``upper`` is one threshold for every row (the incumbent's)."""
    B = len(subs)
    if B == 0:
        return []
    ms = np.array([s.size for s in subs])
    M = int(ms.max())
    k = np.array([s.n_keep for s in subs])
    delta = np.asarray(deltas, dtype=np.float64)
    H = np.zeros((B, M, M))
    W = np.zeros((B, M))
    P = np.zeros((B, M))
    X = np.zeros((B, M))
    c0 = np.empty(B)
    for r, (s, dl, v0) in enumerate(zip(subs, delta, v0s)):
        m = s.size
        H[r, :m, :m] = s.hessian
        H[r, np.arange(m, M), np.arange(m, M)] = dl  # inert padding: A = H − δI is 0 there
        W[r, :m] = s.weights
        P[r, :m] = s.linear - dl * s.weights
        X[r, :m] = s.weights if v0 is None else v0
        c0[r] = -float(s.linear @ s.weights) + 0.5 * dl * float(s.weights @ s.weights) + s.constant
    step = 1.0 / np.maximum(np.asarray(lipschitz, dtype=np.float64), delta)
    gamma = 0.5 * step * delta
    Y = X.copy()
    theta = np.ones(B)
    best = np.full(B, -math.inf)
    best_scores = np.zeros((B, M))
    best_base = np.full(B, -math.inf)
    value = np.full(B, math.inf)
    Z = np.zeros((B, M))
    pruned = np.zeros(B, dtype=bool)
    iters = np.zeros(B, dtype=np.int64)
    live = np.arange(B)  # rows still iterating
    mu = np.full(B, np.nan)  # each row's prox multiplier, the next prox step's start

    def bound_parts(rows: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        d = V - W[rows]
        Ad = np.matmul(H[rows], d[:, :, None])[:, :, 0] - delta[rows, None] * d
        c = (Ad + P[rows]) ** 2 / (2.0 * delta[rows, None])
        base = -(Ad * W[rows]).sum(axis=1) - 0.5 * (d * Ad).sum(axis=1) + c0[rows]
        return base - top_k_sums(c, k[rows]), base, c, (d, Ad)

    def keep_best(rows: np.ndarray, lb: np.ndarray, base: np.ndarray, c: np.ndarray) -> None:
        better = lb > best[rows]
        if better.any():
            idx = rows[better]
            best[idx], best_base[idx], best_scores[idx] = lb[better], base[better], c[better]

    for it in range(1, max_iter + 1):
        if live.size == 0:
            break
        iters[live] = it
        lb, base, c, (d, Ad) = bound_parts(live, Y[live])
        keep_best(live, lb, base, c)
        done = best[live] >= upper
        pruned[live[done]] = True
        live = live[~done]
        if live.size == 0:
            break
        sel = ~done
        u = Ad[sel] + P[live]
        Yl, Xl = Y[live], X[live]
        Xn, Zn, mu[live] = prox_k_support_rows_warm(Yl - step[live, None] * u, k[live], gamma[live], mu[live])
        Z[live] = Zn
        restart = ((Yl - Xn) * (Xn - Xl)).sum(axis=1) > 0.0
        th = theta[live]
        th_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * th * th))
        Y[live] = np.where(restart[:, None], Xn, Xn + ((th - 1.0) / th_new)[:, None] * (Xn - Xl))
        theta[live] = np.where(restart, 1.0, th_new)
        X[live] = Xn
        if it % check_every == 0:
            lbx, basex, cx, (dx, Adx) = bound_parts(live, Xn)
            keep_best(live, lbx, basex, cx)
            with np.errstate(divide="ignore", invalid="ignore"):
                rho = np.where(Zn > 0, Xn * Xn / np.where(Zn > 0, Zn, 1.0), 0.0).sum(axis=1)
            val = 0.5 * (dx * Adx).sum(axis=1) + (P[live] * Xn).sum(axis=1) + 0.5 * delta[live] * rho + c0[live]
            value[live] = val
            b_l = best[live]
            gap = val - b_l
            stop = b_l >= upper
            pruned[live[stop]] = True
            stop |= gap <= rtol * np.maximum(1.0, np.abs(b_l))
            if math.isfinite(upper):
                stop |= (val < upper) & (gap <= 0.01 * (upper - b_l))
            live = live[~stop]
    return [RelaxationResult(float(best[r]), float(value[r]), X[r, :ms[r]].copy(), Z[r, :ms[r]].copy(),
                             best_scores[r, :ms[r]].copy(), float(best_base[r]), int(iters[r]), bool(pruned[r]))
            for r in range(B)]
