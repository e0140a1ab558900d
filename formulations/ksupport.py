"""The squared k-support norm ρ_k and its proximal operator, the penalty of the perspective relaxation.

    ρ_k(v) = min { Σ v_i²/z_i : 0 ≤ z ≤ 1, Σz ≤ k }

(see :mod:`formulations.cuts`, whose :func:`~formulations.cuts.solve_perspective` takes prox steps of
γρ_k). Float64 numpy; vectors of shape (m,). Re-exported by :mod:`formulations.cuts`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["prox_k_support", "prox_k_support_warm", "k_support_squared"]


def prox_k_support(x: np.ndarray, k: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin_v ½‖v − x‖² + γ ρ_k(v), with the minimising z of ρ_k (both (m,)).

    Jointly in (v, z): for fixed z, v_i = x_i z_i/(z_i + 2γ) with value γ x_i²/(z_i + 2γ); minimising that
    over the capped simplex {0 ≤ z ≤ 1, Σz ≤ k} gives z_i = clip(√γ|x_i| μ − 2γ, 0, 1) with μ ≥ 0 the root
    of the piecewise-linear Σ_i z_i(μ) = k (one sweep over its 2m sorted breakpoints: O(m log m), no iteration).
    """
    a = np.abs(x)
    if k <= 0:
        return np.zeros_like(x), np.zeros_like(x)
    nz = a > 0
    n_nz = int(np.count_nonzero(nz))
    if n_nz <= k:
        z = nz.astype(np.float64)
        return x / (1.0 + 2.0 * gamma), z
    sg = math.sqrt(gamma)
    bvec = sg * (a if n_nz == a.size else a[nz])
    two_g = 2.0 * gamma
    # h(μ) = Σ_i clip(b_i μ − 2γ, 0, 1) is piecewise linear: coordinate i starts rising at lo_i = 2γ/b_i
    # (slope b_i) and saturates at hi_i = (1 + 2γ)/b_i. Sweep the sorted events with cumulative sums:
    # after event j, h = (#saturated) + (Σ active b) μ − 2γ (#active).
    inv = 1.0 / bvec
    p = bvec.size
    t = np.concatenate([two_g * inv, (1.0 + two_g) * inv])
    order = np.argsort(t, kind="stable")
    t = t[order]
    is_hi = order >= p
    bb = bvec[order % p]
    slope = np.cumsum(np.where(is_hi, -bb, bb))
    active = np.cumsum(np.where(is_hi, -1.0, 1.0))
    sat = np.cumsum(is_hi.astype(np.float64))
    h = sat + slope * t - two_g * active
    j = int(np.searchsorted(h, k, side="left"))
    j = min(max(j, 1), t.size - 1)
    s_prev = slope[j - 1]
    if s_prev > 0:
        mu = (k - sat[j - 1] + two_g * active[j - 1]) / s_prev
        mu = min(max(mu, t[j - 1]), t[j])
    else:
        mu = t[j]
    z = np.minimum(np.maximum((sg * mu) * a - two_g, 0.0), 1.0)
    return x * z / (z + two_g), z


def prox_k_support_warm(x: np.ndarray, k: int, gamma: float, mu0: float | None) -> tuple[np.ndarray, np.ndarray, float | None]:
    """:func:`prox_k_support` from a guess ``mu0`` of the multiplier μ (e.g. the previous prox step's, which
    a first-order method changes little); returns (v, z, μ) with μ for the next call (None: unknown).

    Σ_i z_i(μ) is piecewise linear in μ; on the piece that holds μ it is |saturated| + Σ_active (√γ μ a_i − 2γ),
    so one linear (Newton) step gives the μ where that piece reaches k. A μ with Σz = k (to 1e-12 relative)
    is the answer; a few steps usually end there (at most 6, no sort), else the exact sweep of
    :func:`prox_k_support` decides (the same answer up to rounding)."""
    a = np.abs(x)
    if mu0 is not None and 0 < k < a.size and mu0 > 0:
        b = math.sqrt(gamma) * a
        two_g = 2.0 * gamma
        mu = mu0
        tol = 1e-12 * k
        for _ in range(6):
            z = np.clip(b * mu - two_g, 0.0, 1.0)
            miss = k - float(z.sum())
            if abs(miss) <= tol:
                return x * z / (z + two_g), z, mu
            slope = float(b[(z > 0.0) & (z < 1.0)].sum())
            if slope <= 0.0:
                break
            mu += miss / slope  # exact on the current piece of Σz(μ)
    v, z = prox_k_support(x, k, gamma)
    # recover μ from an active coordinate (z_i = √γ μ a_i − 2γ strictly inside (0, 1)), for the next call
    act = (z > 0.0) & (z < 1.0)
    mu = None
    if act.any() and gamma > 0:
        i = int(np.flatnonzero(act)[0])
        mu = (z[i] + 2.0 * gamma) / (math.sqrt(gamma) * a[i])
    return v, z, mu


def k_support_squared(v: np.ndarray, k: int) -> float:
    """ρ_k(v) = min {Σ v_i²/z_i : 0 ≤ z ≤ 1, Σz ≤ k} (v_i²/0 = 0 if v_i = 0, else ∞).

    Closed form: with |v| sorted descending a_1 ≥ a_2 ≥ ..., ρ = Σ_{i≤r} a_i² + (Σ_{i>r} a_i)²/(k − r) for the
    r ∈ {0..k−1} with a_r ≥ Σ_{i>r} a_i/(k − r) ≥ a_{r+1} (z = 1 on the top r, ∝ a_i on the rest).
    """
    a = np.sort(np.abs(v))[::-1]
    if k <= 0:
        return 0.0 if not a.any() else math.inf
    if np.count_nonzero(a) <= k:
        return float(a @ a)
    tail = np.cumsum(a[::-1])[::-1]  # tail[r] = Σ_{i≥r} a_i (0-based)
    sq = np.concatenate([[0.0], np.cumsum(a * a)])
    best = math.inf
    for r in range(k):
        theta = tail[r] / (k - r)
        upper_ok = r == 0 or a[r - 1] >= theta * (1 - 1e-12)
        if upper_ok and theta >= a[r] * (1 - 1e-12):
            return float(sq[r] + tail[r] * theta)
        best = min(best, float(sq[r] + tail[r] * theta))
    return best
