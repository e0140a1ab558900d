"""The tightened certificate (engine.certificate) against the brute-force optimum.

Every bound, whatever step gave it (residual, trivial, relaxation dense or matrix-free, branch and bound),
must be ≤ the optimum found by enumeration, on tiny blocks of every kind: well-conditioned, ill-conditioned
(N < n, near-collinear columns), duplicated columns, g ≠ 0, dense F only, N:M patterns. It must also be ≥
the old certificate (the dual bound at the answer's residual), and with a budget branch and bound closes
the gap on these tiny blocks.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import engine.certificate as certificate
from engine.errors import InvalidOptionError
from engine.options import SolveOptions
from engine.result import Status
from engine.solve import solve_block
from formulations.objective import dual_bound, optimal_update, support_objective
from formulations.patterns import pattern_violation
from formulations.problem import BlockProblem

TOL = 1e-9


def _block(kind: str, n: int, k: int, seed: int, pattern=None) -> BlockProblem:
    rng = np.random.default_rng([seed, n, k, len(kind)])
    w = rng.standard_normal(n)
    g = None
    if kind == "well":
        N, lam = 4 * n, 0.05
        X = rng.standard_normal((N, n))
    elif kind == "short":  # N < n: F singular, λ_min(H) = λ
        N, lam = max(2, n // 3), 1e-3
        X = rng.standard_normal((N, n))
    elif kind == "ill":  # scaled, near-collinear columns
        N, lam = n // 2 + 1, 1e-4
        X = rng.standard_normal((N, n)) * np.logspace(-2, 1, n)
        X[:, -1] = X[:, 0] + 1e-3 * rng.standard_normal(N)
    elif kind == "duplicated":  # exact copies of columns (and their weights)
        N, lam = 2 * n, 1e-2
        X = rng.standard_normal((N, n))
        X[:, 1::3] = X[:, 0::3][:, : X[:, 1::3].shape[1]]
    elif kind == "gradient":
        N, lam = 2 * n, 1e-2
        X = rng.standard_normal((N, n))
        g = 0.5 * rng.standard_normal(n)
    elif kind == "fisher":  # only the dense F is held
        X = rng.standard_normal((2 * n, n)) / math.sqrt(2 * n)
        return BlockProblem(w, k, 1e-2, fisher=X.T @ X, pattern=pattern)
    else:
        raise ValueError(kind)
    return BlockProblem(w, k, lam, factor=X / math.sqrt(N), gradient=g, pattern=pattern)


def _optimum(p: BlockProblem) -> float:
    best = math.inf
    for kept in itertools.combinations(range(p.n), p.n_keep):
        S = np.zeros(p.n, dtype=bool)
        S[list(kept)] = True
        if p.pattern is not None and pattern_violation(S, p.pattern):
            continue
        best = min(best, support_objective(p, S))
    return best


KINDS = ["well", "short", "ill", "duplicated", "gradient", "fisher"]
CASES = [(kind, n, k, None) for kind in KINDS for n, k in ((8, 4), (10, 3), (10, 8))]
CASES += [(kind, 8, 4, (2, 4)) for kind in ("well", "ill", "gradient")] + [("short", 9, 3, (1, 3))]


def _answers(p: BlockProblem) -> list[np.ndarray]:
    """A poor answer (the smallest |w|) and a good one (the largest |w|), pattern-respecting."""
    from engine.solvers.base import top_support

    return [top_support(-np.abs(p.weights), p.n_keep, p.pattern), top_support(np.abs(p.weights), p.n_keep, p.pattern)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-n{c[1]}-k{c[2]}" + ("" if c[3] is None else
                                                                                        "-{}of{}".format(*c[3])))
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "matrix-free"])
def test_every_bound_is_below_the_optimum_and_above_the_old_one(case, dense, monkeypatch):
    kind, n, k, pattern = case
    if not dense:
        monkeypatch.setattr(certificate, "DENSE_MAX", 0)  # the large-block path on the same tiny blocks
    p = _block(kind, n, k, seed=0, pattern=pattern)
    opt = _optimum(p)
    tol = TOL * max(1.0, abs(opt))
    for S in _answers(p):
        sol = optimal_update(p, S)
        old = dual_bound(p, alpha=sol.residual)
        for budget in (0, None, 0.02):
            cert = certificate.tighten_bound(p, S, sol.objective, sol.residual, sol.weights, budget, 1.0)
            assert cert.bound <= opt + tol, (budget, cert)
            assert cert.bound >= old - tol
            assert cert.residual_bound == pytest.approx(old, rel=1e-12, abs=1e-12)
            assert cert.bound <= sol.objective + tol
        # each step alone, at longer budgets: the relaxation's best bound is below the optimum too
        relaxed = certificate._relaxation(p, sol.weights, 400, 400, math.inf, dense)
        assert relaxed <= opt + tol


@pytest.mark.parametrize("case", CASES[:9] + CASES[-4:], ids=lambda c: f"{c[0]}-n{c[1]}-k{c[2]}")
def test_a_budget_closes_the_gap_by_branch_and_bound(case):
    kind, n, k, pattern = case
    p = _block(kind, n, k, seed=1, pattern=pattern)
    opt = _optimum(p)
    S = _answers(p)[0]
    sol = optimal_update(p, S)
    cert = certificate.tighten_bound(p, S, sol.objective, sol.residual, sol.weights, 30.0)
    # the search ends within BNB_REL_GAP of its incumbent U ≥ E*: E* − tol ≤ LB ≤ E*
    tol = certificate.BNB_REL_GAP * abs(cert.better_objective or sol.objective) + 1e-12
    assert opt - tol - 1e-12 <= cert.bound <= opt + TOL * max(1.0, abs(opt))
    if sol.objective > opt + 2 * tol:
        assert cert.source == "bnb"
        assert cert.better_objective is not None and opt - 1e-12 <= cert.better_objective <= opt + tol


def test_trivial_bound_caps_the_gap_at_100_percent_without_a_gradient():
    negative = 0
    for kind in ("short", "ill", "duplicated"):
        for seed in range(3):
            p = _block(kind, 10, 5, seed=seed)
            res = solve_block(p, "magnitude", SolveOptions(certify_time=0))
            assert res.bound >= 0.0 and res.gap <= 1.0
            negative += res.extra["residual_bound"] < 0  # the old certificate alone: a gap above 100 %
    assert negative > 0


def test_trivial_bound_with_a_gradient_is_the_unconstrained_minimum():
    p = _block("gradient", 8, 4, seed=2)
    H = p.dense_hessian()
    expected = -0.5 * p.gradient @ np.linalg.solve(H, p.gradient)
    assert certificate._trivial_bound(p, dense=True, allowed=None) == pytest.approx(expected, rel=1e-10)
    assert expected <= _optimum(p)


def test_solve_block_records_the_certificate_and_keeps_exact_bounds():
    p = _block("well", 10, 5, seed=4)
    opt = _optimum(p)
    heur = solve_block(p, "magnitude", SolveOptions(certify_time=5.0))
    assert heur.extra["certificate_from"] in ("residual", "trivial", "relaxation", "bnb")
    assert heur.extra["certificate_seconds"] >= 0
    assert opt * (1 - 2 * certificate.BNB_REL_GAP) <= heur.bound <= opt * (1 + 1e-9)
    true_gap = (heur.objective - opt) / heur.objective
    assert true_gap - 1e-9 <= heur.gap <= true_gap + 2 * certificate.BNB_REL_GAP
    exact = solve_block(p, "bnb")
    assert exact.status == Status.OPTIMAL and "certificate_from" not in exact.extra
    assert exact.bound == pytest.approx(opt, rel=1e-9)


def test_default_budget_tightens_on_a_real_sized_block():
    rng = np.random.default_rng(0)
    n, N = 60, 400
    p = BlockProblem(rng.standard_normal(n), 20, 1e-3, factor=rng.standard_normal((N, n)) / math.sqrt(N))
    res = solve_block(p, "greedy")
    assert res.extra["certificate_from"] in ("relaxation", "trivial")
    assert res.bound >= res.extra["residual_bound"]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", True])
def test_bad_certify_time_is_refused(bad):
    with pytest.raises(InvalidOptionError, match="certify_time"):
        SolveOptions(certify_time=bad)


def test_kept_score_sum_is_the_dual_bounds_top_sum_and_checks_its_shape():
    from formulations.objective import kept_score_sum
    from formulations.errors import InvalidProblemError

    p = _block("well", 8, 3, seed=5)
    c = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 0.0, 6.0])
    assert kept_score_sum(p, c) == pytest.approx(15.0)  # 6 + 5 + 4
    assert kept_score_sum(_block("well", 8, 4, seed=5, pattern=(2, 4)), c) == pytest.approx(5 + 4 + 6 + 3)
    with pytest.raises(InvalidProblemError, match="'scores' argument of kept_score_sum\\(\\) must have shape \\(8,\\)"):
        kept_score_sum(p, c[:5])


def test_dense_subproblem_takes_a_formed_hessian_and_checks_its_shape():
    from formulations.cuts import dense_subproblem
    from formulations.errors import InvalidProblemError

    p = _block("gradient", 6, 3, seed=6)
    H = p.dense_hessian()
    a, b = dense_subproblem(p), dense_subproblem(p, hessian=H)
    assert b.hessian is H and np.array_equal(a.hessian, b.hessian) and np.array_equal(a.linear, b.linear)
    with pytest.raises(InvalidProblemError, match="'hessian' argument of dense_subproblem\\(\\) must have shape"):
        dense_subproblem(p, hessian=H[:5, :5])
