"""Exact solving (issue 3): canonical models, cuts, dual ascent, branch-and-bound, HiGHS, Pyomo and cvxpy.

Oracle: ``brute_force`` (all C(n, k) supports) on n ≤ 12. Exact solvers must equal it (objective within
1e-6 relative) with Status.OPTIMAL, every bound must be ≤ it, and every model builder must give the
brute-force objective at the brute-force optimum. Tests marked ``slow`` drive SCIP through Pyomo/cvxpy.
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib

import numpy as np
import pytest

from engine.options import SolveOptions
from engine.result import Status, Termination
from engine.errors import InvalidOptionError
from engine.solve import solve_block, UnprovenOptimalityWarning
from engine.solvers.branch_and_bound import BranchAndBoundSolver, DenseEvaluator, swap_local_search
from formulations.canonical import (
    binary_qp_model,
    big_m,
    cut_master_model,
    miqp_model,
    miqp_point,
    perspective_relaxation,
    qp_relaxation_model,
)
from formulations.cuts import (
    cut_value,
    dense_subproblem,
    dual_ascent,
    dual_terms,
    dual_value_at_step,
    k_support_squared,
    lower_bound_at_step,
    perspective_shift,
    prox_k_support,
    restrict,
    solve_perspective,
    subproblem_objective,
    support_cut,
)
from formulations.errors import InvalidProblemError
from formulations.objective import (
    dual_bound,
    dual_scores,
    dual_value,
    optimal_update,
    selection_objective,
    support_objective,
)
from formulations.problem import BlockProblem

RTOL = 1e-6


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def make_problem(n: int, k: int, kind: str = "well", gradient: bool = False, seed: int = 0) -> BlockProblem:
    """Random block: 'well' (N = 4n Gaussian, λ = 0.05), 'ill' (N = n/2 + 1, scaled and near-collinear
    columns, λ = 1e-3), 'hard' (the benchmark: N = 2n, X/√N, λ = 1e-2), 'fisher' (dense F)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)
    g = rng.standard_normal(n) * 0.3 if gradient else None
    if kind == "well":
        X = rng.standard_normal((4 * n, n)) / math.sqrt(4 * n)
        return BlockProblem(w, k, 0.05, factor=X, gradient=g)
    if kind == "ill":
        N = n // 2 + 1
        X = rng.standard_normal((N, n)) * np.logspace(-2, 1, n)
        X[:, -1] = X[:, 0] + 1e-3 * rng.standard_normal(N)
        return BlockProblem(w, k, 1e-3, factor=X / math.sqrt(N), gradient=g)
    if kind == "hard":
        X = rng.standard_normal((2 * n, n)) / math.sqrt(2 * n)
        return BlockProblem(w, k, 1e-2, factor=X, gradient=g)
    if kind == "fisher":
        X = rng.standard_normal((2 * n, n)) / math.sqrt(2 * n)
        return BlockProblem(w, k, 1e-2, fisher=X.T @ X, gradient=g)
    raise ValueError(kind)


def brute(problem: BlockProblem) -> tuple[np.ndarray, float]:
    """The itertools oracle (independent of engine.solvers.brute_force)."""
    best, best_S = math.inf, None
    for kept in itertools.combinations(range(problem.n), problem.n_keep):
        S = np.zeros(problem.n, dtype=bool)
        S[list(kept)] = True
        val = support_objective(problem, S)
        if val < best:
            best, best_S = val, S
    return best_S, best


# one table of cases: (n, k, kind, gradient)
CASES = [
    (6, 1, "well", False),
    (6, 3, "ill", True),
    (6, 5, "hard", False),
    (9, 4, "well", True),
    (9, 1, "hard", True),
    (9, 8, "ill", False),
    (10, 5, "fisher", True),
    (12, 6, "hard", False),
    (12, 6, "ill", False),
    (12, 11, "well", True),
    (12, 1, "ill", True),
    (12, 6, "well", True),
]
_ORACLE: dict[tuple, tuple[BlockProblem, np.ndarray, float]] = {}


def case(params: tuple, seed: int = 0) -> tuple[BlockProblem, np.ndarray, float]:
    key = params + (seed,)
    if key not in _ORACLE:
        n, k, kind, grad = params
        p = make_problem(n, k, kind, grad, seed=zlib.crc32(repr(key).encode()) % 1000)  # stable across runs
        S, val = brute(p)
        _ORACLE[key] = (p, S, val)
    return _ORACLE[key]


def _ids(c):
    return f"n{c[0]}-k{c[1]}-{c[2]}{'-g' if c[3] else ''}"


def assert_exact(result, optimum: float) -> None:
    assert result.status == Status.OPTIMAL, result.summary()
    assert result.termination == Termination.OPTIMAL
    assert abs(result.objective - optimum) <= RTOL * max(1.0, abs(optimum)), (result.objective, optimum)
    assert result.bound is not None and result.bound <= optimum + RTOL * max(1.0, abs(optimum))


# ------------------------------------------------------------------------------------- canonical models
@pytest.mark.parametrize("params", CASES[:8], ids=_ids)
def test_canonical_models_evaluate_to_the_oracle(params):
    p, S, opt = case(params)
    sol = optimal_update(p, S)
    forms = [False] if p.factor is None else [False, True]
    for low_rank in forms:
        m = miqp_model(p, low_rank=low_rank)
        x = miqp_point(m, p, S, sol.weights)
        assert m.objective(x) == pytest.approx(opt, rel=1e-9, abs=1e-12)
        assert m.violation(x) <= 1e-9
        assert ("r" in m.var_names) == low_rank
        assert m.integrality[m.var_names["z"]].all() and not m.integrality[m.var_names["v"]].any()
        r = qp_relaxation_model(p, low_rank=low_rank)
        assert not r.integrality.any() and r.objective(x) == pytest.approx(opt, rel=1e-9, abs=1e-12)
    # P is stored lower-triangular
    assert (m.P.tocoo().row >= m.P.tocoo().col).all()
    bq = binary_qp_model(p)
    z = S.astype(float)
    assert bq.objective(z) == pytest.approx(selection_objective(p, S), rel=1e-9, abs=1e-12)
    pm = perspective_relaxation(p)
    xp = np.concatenate([sol.weights, np.where(S, sol.weights**2, 0.0), z])
    assert pm.model.objective(xp) == pytest.approx(opt, rel=1e-9, abs=1e-12)
    assert pm.cones.shape == (p.n, 3)
    c = support_cut(p, S)
    cm = cut_master_model(p, [c])
    xm = np.append(z, c.value)
    assert cm.objective(xm) == pytest.approx(opt, rel=1e-12, abs=1e-14)
    assert cm.violation(xm) <= 1e-9


def test_big_m_is_valid_with_and_without_gradient():
    for grad in (False, True):
        p, S, opt = case((9, 4, "well", grad))
        M, U = big_m(p)
        assert U >= opt - 1e-12
        v = optimal_update(p, S).weights
        assert np.all(np.abs(v) <= M)
        # from the optimum itself (the tightest valid U)
        M2, _ = big_m(p, upper_bound=opt)
        assert np.all(np.abs(v) <= M2) and np.all(M2 <= M + 1e-12)
    with pytest.raises(InvalidProblemError):
        big_m(p, upper_bound=math.inf)


def test_miqp_low_rank_needs_a_factor():
    p = make_problem(6, 3, "fisher")
    with pytest.raises(InvalidProblemError):
        miqp_model(p, low_rank=True)


# ---------------------------------------------------------------------------------------------- cuts
@pytest.mark.parametrize("params", CASES, ids=_ids)
def test_cuts_are_tight_and_valid(params):
    p, S, opt = case(params)
    rng = np.random.default_rng(1)
    delta_max, _ = perspective_shift(p.dense_hessian(), p.damping)
    sub = dense_subproblem(p)
    for shift in (None, delta_max):
        cut = support_cut(p, S, shift)
        assert cut_value(cut, S) == pytest.approx(cut.value)
        assert cut.value == pytest.approx(opt, rel=1e-12)
        # D(d*, z*) = f(z*): tight in the step form as well
        d = optimal_update(p, S).weights - p.weights
        assert dual_value_at_step(sub, cut.shift, d, S) == pytest.approx(opt, rel=1e-9, abs=1e-12)
        for _ in range(10):
            T = np.zeros(p.n, dtype=bool)
            T[rng.choice(p.n, p.n_keep, replace=False)] = True
            assert cut_value(cut, T) <= support_objective(p, T) + 1e-9 * max(1.0, abs(opt))
    # with δ = λ the cut is the DESIGN's dual at α = r
    cut = support_cut(p, S)
    r = optimal_update(p, S).residual
    assert np.allclose(cut.coefficients, dual_scores(p, r), rtol=1e-9, atol=1e-12)
    assert dual_value(p, r, S) == pytest.approx(opt, rel=1e-9, abs=1e-12)


def test_bigger_shift_gives_stronger_cuts():
    p, S, opt = case((12, 6, "hard", False))
    delta_max, _ = perspective_shift(p.dense_hessian(), p.damping)
    assert delta_max > p.damping
    weak, strong = support_cut(p, S), support_cut(p, S, delta_max)
    rng = np.random.default_rng(0)
    for _ in range(20):
        T = np.zeros(p.n, dtype=bool)
        T[rng.choice(p.n, p.n_keep, replace=False)] = True
        assert cut_value(strong, T) >= cut_value(weak, T) - 1e-12


@pytest.mark.parametrize("params", CASES[:8], ids=_ids)
def test_dual_ascent_never_decreases_and_stays_below_the_optimum(params):
    p, S, opt = case(params)
    res = dual_ascent(p, None, iters=60)
    assert res.history[0] == pytest.approx(dual_bound(p))
    assert all(b2 >= b1 for b1, b2 in zip(res.history, res.history[1:]))
    assert res.bound >= res.history[0]
    assert res.bound == pytest.approx(dual_bound(p, alpha=res.alpha), rel=1e-9, abs=1e-12)
    assert res.bound <= opt + 1e-9 * max(1.0, abs(opt))
    # from a heuristic's residual: still never below where it started
    a0 = optimal_update(p, np.argsort(-np.abs(p.weights))[: p.n_keep]).residual
    res2 = dual_ascent(p, a0, iters=30)
    assert res2.bound >= dual_bound(p, alpha=a0) and res2.bound <= opt + 1e-9 * max(1.0, abs(opt))


def test_prox_and_k_support_norm():
    rng = np.random.default_rng(3)
    for _ in range(30):
        m = int(rng.integers(2, 9))
        k = int(rng.integers(1, m))
        x = rng.standard_normal(m)
        if rng.random() < 0.3:
            x[rng.choice(m, 2, replace=False)] = 0.0
        gamma = float(10 ** rng.uniform(-2, 1))
        v, z = prox_k_support(x, k, gamma)
        assert z.sum() <= k + 1e-9 and np.all((z >= -1e-12) & (z <= 1 + 1e-12))
        rho = k_support_squared(v, k)
        pos = z > 0
        assert rho == pytest.approx(float((v[pos] ** 2 / z[pos]).sum()), rel=1e-8, abs=1e-12)
        # ρ is a minimum over z: random feasible z never do better
        for _ in range(5):
            zz = rng.random(m)
            zz = np.minimum(zz * k / zz.sum(), 1.0)
            assert rho <= float((v**2 / zz).sum()) + 1e-9
        # the prox minimises ½‖v − x‖² + γρ(v): random perturbations never do better
        obj = 0.5 * float((v - x) @ (v - x)) + gamma * rho
        for _ in range(5):
            u = v + 0.05 * rng.standard_normal(m)
            assert obj <= 0.5 * float((u - x) @ (u - x)) + gamma * k_support_squared(u, k) + 1e-9


@pytest.mark.parametrize("params", CASES[:8], ids=_ids)
def test_restricted_subproblems_and_node_bounds(params):
    p, S, opt = case(params)
    root = dense_subproblem(p)
    # a full fixing reproduces E(S)
    assert subproblem_objective(root, S) == pytest.approx(opt, rel=1e-9, abs=1e-12)
    rng = np.random.default_rng(2)
    for _ in range(3):
        perm = rng.permutation(p.n)
        n_in = int(rng.integers(0, p.n_keep + 1))
        n_out = int(rng.integers(0, p.n - p.n_keep + 1))
        keep = np.zeros(p.n, dtype=bool)
        keep[perm[:n_in]] = True
        prune = np.zeros(p.n, dtype=bool)
        prune[perm[n_in : n_in + n_out]] = True
        sub = restrict(root, keep, prune)
        # best completion of the node, by enumeration
        best = math.inf
        free = np.flatnonzero(~(keep | prune))
        for extra in itertools.combinations(free, p.n_keep - n_in):
            T = keep.copy()
            T[list(extra)] = True
            best = min(best, support_objective(p, T))
            local = np.isin(sub.index, list(extra))
            assert subproblem_objective(sub, local) == pytest.approx(support_objective(p, T), rel=1e-8, abs=1e-11)
        if 0 < sub.n_keep < sub.size:
            delta, lip = perspective_shift(sub.hessian, p.damping)
            res = solve_perspective(sub, delta, lip, max_iter=500)
            assert res.bound <= best + 1e-9 * max(1.0, abs(best))
            base, c = dual_terms(sub, delta, res.v - sub.weights)
            assert lower_bound_at_step(sub, delta, res.v - sub.weights) <= best + 1e-9 * max(1.0, abs(best))


def test_swap_local_search_only_improves():
    p, S, opt = case((12, 6, "ill", False))
    ev = DenseEvaluator(p)
    start = np.zeros(p.n, dtype=bool)
    start[: p.n_keep] = True
    T, val, passes = swap_local_search(ev, start)
    assert int(T.sum()) == p.n_keep
    assert val == pytest.approx(support_objective(p, T), rel=1e-8)
    assert val <= support_objective(p, start) + 1e-12 and val >= opt - 1e-9


def test_dense_evaluator_matches_the_objective_on_both_sides():
    for params in [(9, 4, "well", True), (9, 6, "ill", True)]:
        p, S, opt = case(params)
        ev = DenseEvaluator(p)
        rng = np.random.default_rng(0)
        sup = np.zeros((5, p.n), dtype=bool)
        for r in range(5):
            sup[r, rng.choice(p.n, p.n_keep, replace=False)] = True
        vals = ev.values(sup)
        for r in range(5):
            assert vals[r] == pytest.approx(support_objective(p, sup[r]), rel=1e-8, abs=1e-11)


# ------------------------------------------------------------------------------------- exact solvers
@pytest.mark.parametrize("params", CASES, ids=_ids)
def test_branch_and_bound_equals_brute_force(params):
    for seed in (0, 1):
        p, S, opt = case(params, seed)
        assert_exact(solve_block(p, BranchAndBoundSolver()), opt)


def test_branch_and_bound_against_engine_oracle_and_harder_cases():
    from engine.solvers.brute_force import BruteForceSolver

    for n, seed in ((16, 0), (18, 1)):
        p = make_problem(n, n // 2, "hard", seed=seed)
        ref = solve_block(p, BruteForceSolver())
        r = solve_block(p, BranchAndBoundSolver())
        assert_exact(r, ref.objective)


def test_branch_and_bound_warm_start_and_trivial_budgets():
    p, S, opt = case((12, 6, "hard", False))
    r = solve_block(p, BranchAndBoundSolver(), warm_start=S)
    assert_exact(r, opt)
    assert np.array_equal(r.support, S) or r.objective <= opt
    for k in (0, p.n):
        q = p.with_n_keep(k)
        r = solve_block(q, BranchAndBoundSolver())
        assert r.status == Status.OPTIMAL and int(r.support.sum()) == k


def test_branch_and_bound_time_and_node_limits_return_the_incumbent():
    p = make_problem(60, 30, "hard", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        r = solve_block(p, BranchAndBoundSolver(), SolveOptions(time_limit=0.3))
        r2 = solve_block(p, BranchAndBoundSolver(max_nodes=3))
    for res, term in ((r, Termination.TIME_LIMIT), (r2, Termination.ITERATION_LIMIT)):
        assert res.termination == term and res.status == Status.FEASIBLE
        assert res.bound is not None and res.bound <= res.objective and res.gap is not None and res.gap > 0
        assert int(res.support.sum()) == 30


def test_invalid_solver_options_are_rejected():
    with pytest.raises(InvalidOptionError, match="rel_gap"):
        BranchAndBoundSolver(rel_gap=2.0)
    with pytest.raises(InvalidOptionError, match="max_nodes"):
        BranchAndBoundSolver(max_nodes=0)
    from engine.solvers.highs import HighsSolver
    from engine.solvers.pyomo_backend import PyomoSolver
    from engine.solvers.cvxpy_backend import CvxpySolver

    with pytest.raises(InvalidOptionError, match="max_rounds"):
        HighsSolver(max_rounds=0)
    with pytest.raises(InvalidOptionError, match="solver_name"):
        PyomoSolver(solver_name="cplex")
    with pytest.raises(InvalidOptionError, match="relaxation"):
        CvxpySolver(relaxation="lagrangian")
    with pytest.raises(InvalidOptionError, match="solver"):
        CvxpySolver(solver="HIGHS")


# ---------------------------------------------------------------------------------------------- HiGHS
@pytest.mark.parametrize("params", CASES, ids=_ids)
def test_highs_cutting_planes_equal_brute_force(params):
    from engine.solvers.highs import HighsSolver

    p, S, opt = case(params)
    assert_exact(solve_block(p, HighsSolver()), opt)


def test_highs_time_limit_returns_incumbent_and_gap():
    from engine.solvers.highs import HighsSolver

    p = make_problem(30, 15, "hard", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        r = solve_block(p, HighsSolver(), SolveOptions(time_limit=1.0))
    assert r.termination in (Termination.TIME_LIMIT, Termination.OPTIMAL)
    assert r.bound is not None and r.bound <= r.objective + 1e-12
    if r.termination == Termination.TIME_LIMIT:
        assert r.status == Status.FEASIBLE and r.gap > 0


def test_qp_relaxation_is_a_valid_but_worthless_bound():
    from engine.solvers.highs import qp_relaxation_bound

    for params in [(9, 4, "well", False), (9, 4, "well", True), (12, 6, "hard", False)]:
        p, S, opt = case(params)
        b = qp_relaxation_bound(p)
        assert b <= opt + 1e-9
        H = p.dense_hessian()
        g = p.gradient if p.gradient is not None else np.zeros(p.n)
        # big-M is loose, so the relaxation reaches the unconstrained minimum −½gᵀH⁻¹g (0 for g = 0)
        assert b == pytest.approx(-0.5 * g @ np.linalg.solve(H, g), abs=1e-6 * max(1.0, abs(opt)))


def test_budget_allocation_matches_brute_force():
    from engine.solvers.highs import solve_budget_allocation

    rng = np.random.default_rng(0)
    for trial in range(6):
        B = int(rng.integers(1, 4))
        curves = []
        for _ in range(B):
            ks = np.sort(rng.choice(np.arange(0, 9), size=int(rng.integers(1, 5)), replace=False))
            Es = np.sort(rng.random(ks.size))[::-1] * 10  # losses fall as the budget grows
            curves.append((ks.tolist(), Es.tolist()))
        totals = {sum(c) for c in itertools.product(*[cv[0] for cv in curves])}
        K = sorted(totals)[len(totals) // 2]
        best = min(
            (sum(cv[1][cv[0].index(kb)] for cv, kb in zip(curves, choice)), choice)
            for choice in itertools.product(*[cv[0] for cv in curves])
            if sum(choice) == K
        )
        got = solve_budget_allocation(curves, K)
        assert sum(got) == K
        assert sum(cv[1][cv[0].index(kb)] for cv, kb in zip(curves, got)) == pytest.approx(best[0])
    with pytest.raises(InvalidProblemError, match="total_k"):
        solve_budget_allocation([([0, 2], [1.0, 0.5])], 1)
    with pytest.raises(InvalidProblemError, match="curves"):
        solve_budget_allocation([([0, 2], [1.0])], 2)
    with pytest.raises(InvalidProblemError, match="total_k"):
        solve_budget_allocation([([0, 2], [1.0, 0.5])], -1)


# ------------------------------------------------------------------------------- SCIP through Pyomo/cvxpy
needs_scip = pytest.mark.skipif(not _has("pyscipopt"), reason="pyscipopt (SCIP) is not installed: pip install 'cbs-prune[scip]'")


@pytest.mark.slow
@needs_scip
@pytest.mark.parametrize("params", [CASES[i] for i in (0, 1, 3, 6, 7, 10)], ids=_ids)
def test_pyomo_scip_equals_brute_force(params):
    from engine.solvers.pyomo_backend import PyomoSolver

    p, S, opt = case(params)
    assert_exact(solve_block(p, PyomoSolver(), SolveOptions(time_limit=60)), opt)


@pytest.mark.slow
@needs_scip
@pytest.mark.parametrize("params", [CASES[i] for i in (0, 2, 4, 6, 8, 11)], ids=_ids)
def test_cvxpy_scip_equals_brute_force(params):
    from engine.solvers.cvxpy_backend import CvxpySolver

    p, S, opt = case(params)
    assert_exact(solve_block(p, CvxpySolver(), SolveOptions(time_limit=60)), opt)


@pytest.mark.slow
@needs_scip
def test_scip_backends_honour_the_time_limit():
    import time

    from engine.solvers.cvxpy_backend import CvxpySolver
    from engine.solvers.pyomo_backend import PyomoSolver

    p = make_problem(30, 15, "hard", seed=0)
    for solver in (PyomoSolver(), CvxpySolver()):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnprovenOptimalityWarning)
            r = solve_block(p, solver, SolveOptions(time_limit=2.0))
        assert time.perf_counter() - t0 < 30
        assert r.termination in (Termination.TIME_LIMIT, Termination.OPTIMAL)
        if r.termination == Termination.TIME_LIMIT:
            assert r.status == Status.FEASIBLE


def test_perspective_bound_through_cvxpy_is_certified():
    from engine.solvers.cvxpy_backend import CvxpySolver, perspective_bound

    p, S, opt = case((12, 6, "hard", False))
    strong, conic = perspective_bound(p)
    weak, _ = perspective_bound(p, shift="damping")
    assert weak <= strong <= opt + 1e-9
    assert strong == pytest.approx(conic, rel=1e-4)
    # equals our own FISTA relaxation
    sub = dense_subproblem(p)
    delta, lip = perspective_shift(sub.hessian, p.damping)
    assert solve_perspective(sub, delta, lip, max_iter=3000, rtol=1e-10).bound == pytest.approx(strong, rel=1e-5)
    r = solve_block(p, CvxpySolver(relaxation="perspective"))
    assert r.status == Status.FEASIBLE and r.bound <= opt + 1e-9


@pytest.mark.skipif(not _has("gurobipy"), reason="gurobipy is not installed: pip install 'cbs-prune[gurobi]'")
@pytest.mark.parametrize("params", [CASES[i] for i in (1, 6, 7)], ids=_ids)
def test_gurobi_backends_equal_brute_force(params):
    from engine.solvers.cvxpy_backend import CvxpySolver
    from engine.solvers.pyomo_backend import PyomoSolver

    p, S, opt = case(params)
    assert_exact(solve_block(p, CvxpySolver(solver="GUROBI"), SolveOptions(time_limit=60)), opt)
    assert_exact(solve_block(p, PyomoSolver(solver_name="gurobi"), SolveOptions(time_limit=60)), opt)


def test_pyomo_highs_gives_only_a_relaxation_bound():
    from engine.solvers.pyomo_backend import PyomoSolver

    p, S, opt = case((9, 4, "well", False))
    solver = PyomoSolver(solver_name="highs")
    assert not solver.capabilities.exact
    r = solve_block(p, solver)
    assert r.status == Status.FEASIBLE and r.bound <= opt + 1e-9
    assert solver.relaxation_bound(p) == pytest.approx(0.0, abs=1e-7)
