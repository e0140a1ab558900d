"""Seeded random block problems shared by the solver tests (well- and ill-conditioned)."""

import numpy as np

from formulations.problem import BlockProblem


def make_problem(
    n: int, k: int, seed: int, kind: str = "well", with_gradient: bool = False, N: int | None = None
) -> BlockProblem:
    """A seeded random block. ``well``: N = 4n Gaussian rows, λ = 0.1. ``ill``: N = n/2, columns built
    from a few shared directions plus 5 % noise (strongly correlated), λ = 1e-4."""
    rng = np.random.default_rng(seed)
    if kind == "well":
        N = N or 4 * n
        X = rng.standard_normal((N, n)) / np.sqrt(N)
        lam = 0.1
    else:
        N = N or max(1, n // 2)
        r = max(1, n // 3)
        shared = rng.standard_normal((N, r)) @ rng.standard_normal((r, n))
        X = (shared + 0.05 * rng.standard_normal((N, n))) / np.sqrt(N)
        lam = 1e-4
    w = rng.standard_normal(n)
    g = 0.1 * rng.standard_normal(n) if with_gradient else None
    return BlockProblem(w, k, lam, factor=X, gradient=g)
