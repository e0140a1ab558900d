"""The batched relaxation (formulations.batch_relax) and the warm-started prox against their one-at-a-time
references: the same prox, the same bounds and iteration counts, and bnb with batches still equal to
brute force (tests/test_exact.py runs the default batch; here batch = 1 and 64 as well)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.errors import InvalidOptionError
from engine.options import SolveOptions
from engine.result import Status
from engine.solvers.branch_and_bound import BranchAndBoundSolver
from formulations.batch_relax import prox_k_support_rows, prox_k_support_rows_warm, solve_perspective_batch, top_k_sums
from formulations.cuts import dense_subproblem, perspective_shift, restrict, solve_perspective
from formulations.ksupport import prox_k_support, prox_k_support_warm
from formulations.objective import support_objective
from formulations.problem import BlockProblem


def _rows(rng, B=6):
    M = int(rng.integers(3, 40))
    ms = rng.integers(2, M + 1, size=B)
    x = rng.standard_normal((B, M)) * 10 ** rng.uniform(-2, 2, size=(B, 1))
    for r in range(B):
        x[r, ms[r]:] = 0.0  # padding
    k = np.array([int(rng.integers(1, m)) for m in ms])
    g = 10 ** rng.uniform(-4, 1, size=B)
    return x, ms, k, g


def test_prox_rows_and_warm_prox_equal_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(150):
        x, ms, k, g = _rows(rng)
        V, Z = prox_k_support_rows(x, k, g)
        x2 = x + 1e-2 * rng.standard_normal(x.shape) * (x != 0)
        _, _, mu = prox_k_support_rows_warm(x, k, g, np.full(len(k), np.nan))
        V2, Z2, _ = prox_k_support_rows_warm(x2, k, g, mu)
        for r, m in enumerate(ms):
            v, z = prox_k_support(x[r, :m], int(k[r]), float(g[r]))
            np.testing.assert_allclose(V[r, :m], v, rtol=1e-8, atol=1e-12 * (1 + np.abs(x[r]).max()))
            np.testing.assert_allclose(Z[r, :m], z, rtol=1e-8, atol=1e-9)
            assert not V[r, m:].any() and not Z[r, m:].any()
            v2, z2 = prox_k_support(x2[r, :m], int(k[r]), float(g[r]))
            np.testing.assert_allclose(V2[r, :m], v2, rtol=1e-8, atol=1e-12 * (1 + np.abs(x2[r]).max()))
            _, _, mu1 = prox_k_support_warm(x[r, :m], int(k[r]), float(g[r]), None)
            v3, z3, _ = prox_k_support_warm(x2[r, :m], int(k[r]), float(g[r]), mu1)
            np.testing.assert_allclose(v3, v2, rtol=1e-8, atol=1e-12 * (1 + np.abs(x2[r]).max()))


def test_top_k_sums():
    c = np.array([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, 4.0]])
    np.testing.assert_allclose(top_k_sums(c, np.array([2, 0])), [5.0, 0.0])
    np.testing.assert_allclose(top_k_sums(c, np.array([4, 3])), [6.0, 10.0])


def _subproblems(seed: int, count: int = 10):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        n = int(rng.integers(6, 40))
        X = rng.standard_normal((int(rng.integers(n // 2 + 1, 3 * n)), n))
        g = 0.2 * rng.standard_normal(n) if len(out) % 2 else None
        p = BlockProblem(rng.standard_normal(n), int(rng.integers(1, n)), 10 ** rng.uniform(-3, -1),
                         factor=X / math.sqrt(X.shape[0]), gradient=g)
        keep, prune = np.zeros(n, bool), np.zeros(n, bool)
        keep[0], prune[1] = True, True
        sub = restrict(dense_subproblem(p), keep, prune)
        if 0 < sub.n_keep < sub.size:
            out.append((sub, *perspective_shift(sub.hessian, p.damping)))
    return out


@pytest.mark.parametrize("upper", [math.inf, 0.3])
def test_batch_equals_one_at_a_time(upper):
    items = _subproblems(1)
    subs, deltas, lips = zip(*items)
    batch = solve_perspective_batch(subs, deltas, lips, [None] * len(subs), upper=upper, max_iter=200)
    for (sub, d, lip), b in zip(items, batch):
        a = solve_perspective(sub, d, lip, upper=upper, max_iter=200)
        assert b.bound == pytest.approx(a.bound, rel=1e-9, abs=1e-12)
        assert (b.iterations, b.pruned) == (a.iterations, a.pruned)
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-8, atol=1e-12)
        assert b.v.shape == (sub.size,)


@pytest.mark.parametrize("batch", [1, 64])
def test_bnb_with_any_batch_equals_brute_force(batch):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        n, k = 11, 5
        X = rng.standard_normal((n, n)) / math.sqrt(n)
        p = BlockProblem(rng.standard_normal(n), k, 1e-2, factor=X)
        best = min(support_objective(p, np.isin(np.arange(n), c)) for c in itertools.combinations(range(n), k))
        res = BranchAndBoundSolver(batch=batch).solve(p, SolveOptions())
        assert res.status == Status.OPTIMAL and res.objective == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_batch_is_refused(bad):
    with pytest.raises(InvalidOptionError, match="batch"):
        BranchAndBoundSolver(batch=bad)
