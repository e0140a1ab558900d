"""The oracle table (DESIGN.md §5): every solver × seeded random problems, checked against enumeration.

All answers go through ``engine.solve.solve_block`` (which re-scores E(S) and attaches the dual
certificate). The brute-force optimum is recomputed here independently with itertools and
``formulations.objective.support_objective``.
"""

from __future__ import annotations

import functools
import itertools
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidOptionError
from engine.options import SolveOptions
from engine.result import Status, Termination
from engine.solve import UnprovenOptimalityWarning, solve_block
from engine.solvers.brute_force import BruteForceSolver
from engine.solvers.greedy import GreedySolver, obs_elimination
from engine.solvers.iht import IHTSolver, lipschitz_constant
from engine.solvers.magnitude import MagnitudeSolver
from engine.solvers.registry import get_solver
from engine.solvers.woodfisher import (
    WoodFisherSolver,
    hessian_inverse,
    hessian_inverse_diagonal,
    hessian_matrix,
    obs_scores,
)
from formulations.objective import optimal_update, support_objective
from formulations.problem import BlockProblem
from random_problems import make_problem

SOLVERS = ["magnitude", "woodfisher", "greedy", "iht", "brute_force"]
N_WEIGHTS = 10




@functools.lru_cache(maxsize=None)
def cached_problem(n: int, k: int, seed: int, kind: str, with_gradient: bool) -> BlockProblem:
    return make_problem(n, k, seed, kind, with_gradient)


@functools.lru_cache(maxsize=None)
def oracle(n: int, k: int, seed: int, kind: str, with_gradient: bool) -> float:
    """min over all |S| = k of E(S), by itertools."""
    problem = cached_problem(n, k, seed, kind, with_gradient)
    return min(support_objective(problem, np.array(c, dtype=np.intp)) for c in itertools.combinations(range(n), k))


def tolerance(value: float) -> float:
    return 1e-9 * max(1.0, abs(value))


K_VALUES = [0, 1, N_WEIGHTS // 2, N_WEIGHTS - 1, N_WEIGHTS]
CASES = [
    (N_WEIGHTS, k, seed, kind, with_gradient)
    for kind in ("well", "ill")
    for with_gradient in (False, True)
    for k in K_VALUES
    for seed in range(3)
]


def _case_id(case) -> str:
    n, k, seed, kind, with_gradient = case
    return f"{kind}-{'g' if with_gradient else 'nog'}-k{k}-s{seed}"


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("solver", SOLVERS)
def test_oracle_table(solver, case):
    problem = cached_problem(*case)
    optimum = oracle(*case)
    tol = tolerance(optimum)
    result = solve_block(problem, solver)
    assert result.support.dtype == bool and result.support.shape == (problem.n,)
    assert int(result.support.sum()) == problem.n_keep
    assert result.objective == pytest.approx(support_objective(problem, result.support), rel=1e-12, abs=1e-14)
    assert result.objective >= optimum - tol
    assert result.bound is not None and result.bound <= optimum + tol
    assert result.solver == solver
    assert result.wall_time >= 0.0
    json.dumps(result.extra)
    json.dumps(result.summary())
    if solver == "brute_force":
        assert result.status == Status.OPTIMAL and result.termination == Termination.OPTIMAL
        assert result.objective == pytest.approx(optimum, rel=1e-9, abs=1e-12)
        assert result.bound == pytest.approx(result.objective, rel=1e-12, abs=1e-14)
        assert result.gap == pytest.approx(0.0, abs=1e-12)
    else:
        assert result.status == Status.FEASIBLE
        assert result.termination in (Termination.COMPLETED, Termination.LOCAL_OPTIMUM)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_iht_never_worse_than_its_magnitude_start(case):
    problem = cached_problem(*case)
    magnitude = solve_block(problem, "magnitude")
    iht = solve_block(problem, "iht", warm_start=magnitude.support)
    assert iht.objective <= magnitude.objective + tolerance(magnitude.objective)


@pytest.mark.parametrize("kind", ["well", "ill"])
def test_greedy_beats_magnitude_on_average(kind):
    greedy, magnitude = [], []
    for seed in range(10):
        problem = make_problem(12, 6, 100 + seed, kind)
        greedy.append(solve_block(problem, "greedy").objective)
        magnitude.append(solve_block(problem, "magnitude").objective)
    assert np.mean(greedy) < np.mean(magnitude)


@pytest.mark.parametrize("kind", ["well", "ill"])
def test_iht_improves_on_magnitude_on_average(kind):
    iht, magnitude = [], []
    for seed in range(10):
        problem = make_problem(12, 6, 200 + seed, kind)
        iht.append(solve_block(problem, "iht").objective)
        magnitude.append(solve_block(problem, "magnitude").objective)
    assert np.mean(iht) < np.mean(magnitude)


def test_exact_solver_on_twelve_weights():
    # n = 12, k = 6 (924 supports): the largest table size, once per conditioning
    for kind in ("well", "ill"):
        problem = make_problem(12, 6, 7, kind, with_gradient=True)
        optimum = min(
            support_objective(problem, np.array(c, dtype=np.intp)) for c in itertools.combinations(range(12), 6)
        )
        result = solve_block(problem, "brute_force")
        assert result.objective == pytest.approx(optimum, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("kind", ["well", "ill"])
@pytest.mark.parametrize("with_gradient", [False, True])
def test_greedy_claimed_increase_is_the_true_change(batch, kind, with_gradient):
    problem = make_problem(12, 0, 5, kind, with_gradient)
    path = obs_elimination(problem, batch=batch)
    assert path.completed and sorted(path.removed.tolist()) == list(range(12))
    kept = np.ones(12, dtype=bool)
    before = optimal_update(problem, kept).objective
    assert path.start_objective == pytest.approx(before, rel=1e-9, abs=1e-12)
    for i, claimed in zip(path.removed, path.increases):
        kept[i] = False
        after = optimal_update(problem, kept).objective
        assert claimed == pytest.approx(after - before, rel=1e-7, abs=1e-10 * max(1.0, abs(after)))
        assert claimed >= 0.0
        before = after
    assert path.claimed_objective == pytest.approx(before, rel=1e-8, abs=1e-10)


def test_greedy_steps_are_the_cheapest_removal():
    problem = make_problem(8, 3, 11, "ill", with_gradient=True)
    path = obs_elimination(problem)
    kept = np.ones(8, dtype=bool)
    for i, claimed in zip(path.removed, path.increases):
        base = optimal_update(problem, kept).objective
        costs = {}
        for j in np.flatnonzero(kept):
            trial = kept.copy()
            trial[j] = False
            costs[j] = optimal_update(problem, trial).objective - base
        assert costs[i] <= min(costs.values()) + 1e-9 * max(1.0, abs(base))
        kept[i] = False


def test_greedy_time_limit_returns_a_feasible_support():
    problem = make_problem(40, 10, 0)
    result = solve_block(problem, GreedySolver(batch=8), SolveOptions(time_limit=1e-9))
    assert result.termination == Termination.TIME_LIMIT
    assert int(result.support.sum()) == 10


def test_greedy_medium_block_with_float32_factor():
    # exercises the batched downdates and the compaction of removed rows (n = 300 > several batches)
    rng = np.random.default_rng(0)
    n, N = 300, 120
    X = (rng.standard_normal((N, n)) / np.sqrt(N)).astype(np.float32)
    problem = BlockProblem(rng.standard_normal(n), 60, 1e-2, factor=X)
    path = obs_elimination(problem, batch=16)
    kept = np.ones(n, dtype=bool)
    kept[path.removed] = False
    assert kept.sum() == 60
    assert path.claimed_objective == pytest.approx(optimal_update(problem, kept).objective, rel=1e-6)
    assert solve_block(problem, "greedy").objective <= solve_block(problem, "magnitude").objective


# --------------------------------------------------------------------------- woodfisher


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lam", [1e-1, 1e-3])
@pytest.mark.parametrize("seed", range(3))
def test_woodbury_diagonal_equals_dense(dtype, lam, seed):
    rng = np.random.default_rng(seed)
    n, N = 40, 9
    X = (rng.standard_normal((N, n)) / np.sqrt(N)).astype(dtype)
    problem = BlockProblem(rng.standard_normal(n), 10, lam, factor=X)
    # tiny chunks force several passes over the columns (woodbury) and rows (dense)
    woodbury = hessian_inverse_diagonal(problem, "woodbury", chunk_bytes=8 * N * 7)
    dense = hessian_inverse_diagonal(problem, "dense", chunk_bytes=8 * n * 2)
    assert np.max(np.abs(woodbury / dense - 1.0)) <= 1e-8
    X64 = X.astype(np.float64)
    reference = np.diag(np.linalg.inv(X64.T @ X64 + lam * np.eye(n)))
    assert np.max(np.abs(dense / reference - 1.0)) <= 1e-8
    assert np.allclose(obs_scores(problem), problem.weights**2 / reference, rtol=1e-8)


def test_woodfisher_methods_agree_and_report_the_path():
    problem = make_problem(30, 12, 3, "well", N=10)
    a = solve_block(problem, WoodFisherSolver(method="woodbury", chunk_mb=0.001))
    b = solve_block(problem, WoodFisherSolver(method="dense"))
    c = solve_block(problem, "woodfisher")
    assert np.array_equal(a.support, b.support) and np.array_equal(a.support, c.support)
    assert a.extra["method"] == "woodbury" and b.extra["method"] == "dense" and c.extra["method"] == "woodbury"


def test_woodfisher_with_dense_fisher():
    base = make_problem(8, 3, 1)
    X = base.factor
    problem = BlockProblem(base.weights, 3, base.damping, fisher=X.T @ X)
    assert np.allclose(obs_scores(problem), obs_scores(base), rtol=1e-10)
    assert solve_block(problem, WoodFisherSolver(method="woodbury")).extra["method"] == "dense"


def test_hessian_helpers():
    problem = make_problem(9, 3, 2, "ill")
    X = problem.factor
    H = X.T @ X + problem.damping * np.eye(9)
    assert np.allclose(hessian_matrix(problem, chunk_bytes=8 * 9), H, rtol=1e-12, atol=1e-14)
    assert np.allclose(hessian_inverse(problem) @ H, np.eye(9), atol=1e-8)


def test_woodfisher_is_magnitude_for_isotropic_curvature():
    # H = λI makes [H⁻¹]_ii constant, so the OBS scores rank like |w|
    rng = np.random.default_rng(0)
    problem = BlockProblem(rng.standard_normal(10), 4, 1.0, fisher=np.zeros((10, 10)))
    assert np.array_equal(solve_block(problem, "woodfisher").support, solve_block(problem, "magnitude").support)


# --------------------------------------------------------------------------- iht


def test_iht_lipschitz_estimate_bounds_the_spectrum():
    problem = make_problem(20, 5, 0, "ill")
    top = np.linalg.eigvalsh(problem.dense_hessian())[-1]
    L = lipschitz_constant(problem, seed=3)
    assert top <= L <= 1.06 * top


@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize("active_set", [False, True])
def test_iht_variants_never_worse_than_start(line_search, active_set):
    solver = IHTSolver(max_iter=200, line_search=line_search, active_set=active_set)
    for seed in range(4):
        problem = make_problem(12, 4, 300 + seed, "ill", with_gradient=bool(seed % 2))
        start = np.zeros(12, dtype=bool)
        start[np.random.default_rng(seed).choice(12, 4, replace=False)] = True
        result = solve_block(problem, solver, warm_start=start)
        before = support_objective(problem, start)
        assert result.objective <= before + tolerance(before)
        assert result.extra["start_objective"] == pytest.approx(before)


def test_iht_is_deterministic_for_a_seed_and_honours_limits():
    problem = make_problem(12, 5, 9, "ill")
    a = solve_block(problem, "iht", SolveOptions(seed=4))
    b = solve_block(problem, "iht", SolveOptions(seed=4))
    assert np.array_equal(a.support, b.support) and a.iterations == b.iterations
    limited = solve_block(problem, IHTSolver(max_iter=1, active_set=False, line_search=True, tol=0.0))
    assert limited.termination in (Termination.ITERATION_LIMIT, Termination.LOCAL_OPTIMUM)
    assert limited.iterations == 1
    timed = solve_block(problem, "iht", SolveOptions(time_limit=1e-9))
    assert timed.termination == Termination.TIME_LIMIT and int(timed.support.sum()) == 5


def test_iht_matrix_free_on_a_wide_float32_block():
    rng = np.random.default_rng(0)
    n, N = 3000, 200
    X = (rng.standard_normal((N, n)) / np.sqrt(N)).astype(np.float32)
    problem = BlockProblem(rng.standard_normal(n), 600, 1e-2, factor=X)
    start = time.perf_counter()
    result = solve_block(problem, IHTSolver(max_iter=20), SolveOptions(certify=False))
    assert time.perf_counter() - start < 30
    assert int(result.support.sum()) == 600
    assert result.objective <= solve_block(problem, "magnitude", SolveOptions(certify=False)).objective


# --------------------------------------------------------------------------- brute force


def test_brute_force_time_limit_returns_incumbent_without_bound():
    problem = make_problem(20, 10, 0, "ill")  # C(20, 10) = 184,756 supports: more than one batch
    solver = BruteForceSolver()
    raw = solver.solve(problem, SolveOptions(time_limit=1e-9))
    assert raw.status == Status.FEASIBLE and raw.termination == Termination.TIME_LIMIT and raw.bound is None
    assert 0 < raw.extra["enumerated"] < raw.extra["total"]
    with pytest.warns(UnprovenOptimalityWarning):
        checked = solve_block(problem, solver, SolveOptions(time_limit=1e-9))
    assert checked.status == Status.FEASIBLE and int(checked.support.sum()) == 10


def test_brute_force_time_limit_keeps_a_better_warm_start():
    problem = make_problem(20, 10, 1, "ill")
    greedy = solve_block(problem, "greedy")
    with pytest.warns(UnprovenOptimalityWarning):
        result = solve_block(problem, "brute_force", SolveOptions(time_limit=1e-9), warm_start=greedy.support)
    assert result.objective <= greedy.objective + tolerance(greedy.objective)


def test_brute_force_refuses_large_blocks():
    problem = make_problem(10, 5, 0)
    with pytest.raises(InvalidOptionError, match="max_size = 8"):
        BruteForceSolver(max_size=8).solve(problem, SolveOptions())
    with pytest.raises(InvalidOptionError, match="at most 8 weights"):
        solve_block(problem, BruteForceSolver(max_size=8))
    with pytest.raises(InvalidOptionError, match=r"max_supports = 100.*C\(10, 5\) = 252"):
        solve_block(problem, BruteForceSolver(max_supports=100))


# --------------------------------------------------------------------------- permutations (hypothesis)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**20),
    kind=st.sampled_from(["well", "ill"]),
    with_gradient=st.booleans(),
    perm=st.permutations(list(range(8))),
    data=st.data(),
)
def test_permuting_coordinates_permutes_the_support(seed, kind, with_gradient, perm, data):
    k = data.draw(st.integers(0, 8), label="k")
    problem = make_problem(8, k, seed, kind, with_gradient)
    perm = np.asarray(perm)
    permuted = BlockProblem(
        problem.weights[perm],
        k,
        problem.damping,
        factor=problem.factor[:, perm],
        gradient=None if problem.gradient is None else problem.gradient[perm],
    )
    for solver in ("brute_force", "magnitude", "woodfisher"):
        a = solve_block(problem, solver, SolveOptions(certify=False)).support
        b = solve_block(permuted, solver, SolveOptions(certify=False)).support
        assert np.array_equal(b, a[perm]), solver


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), n=st.integers(1, 9), data=st.data())
def test_every_solver_returns_k_weights(seed, n, data):
    k = data.draw(st.integers(0, n), label="k")
    problem = make_problem(n, k, seed, data.draw(st.sampled_from(["well", "ill"]), label="kind"))
    for solver in SOLVERS:
        assert int(solve_block(problem, solver, SolveOptions(certify=False)).support.sum()) == k


# --------------------------------------------------------------------------- constructor validation


@pytest.mark.parametrize(
    "name, params, argument",
    [
        ("woodfisher", {"method": "cholesky"}, "method"),
        ("woodfisher", {"chunk_mb": 0}, "chunk_mb"),
        ("woodfisher", {"chunk_mb": float("nan")}, "chunk_mb"),
        ("greedy", {"batch": 0}, "batch"),
        ("greedy", {"batch": 2.5}, "batch"),
        ("iht", {"max_iter": 0}, "max_iter"),
        ("iht", {"max_iter": 10.0}, "max_iter"),
        ("iht", {"tol": -1.0}, "tol"),
        ("iht", {"tol": float("inf")}, "tol"),
        ("iht", {"active_set": "yes"}, "active_set"),
        ("iht", {"line_search": 1}, "line_search"),
        ("iht", {"patience": 0}, "patience"),
        ("brute_force", {"max_size": 0}, "max_size"),
        ("brute_force", {"max_size": 41}, "max_size"),
        ("brute_force", {"max_size": True}, "max_size"),
        ("brute_force", {"max_supports": 0}, "max_supports"),
    ],
)
def test_bad_constructor_arguments(name, params, argument):
    with pytest.raises(InvalidOptionError, match=f"'{argument}' argument of"):
        get_solver(name, **params)


def test_magnitude_takes_no_parameters():
    with pytest.raises(TypeError):
        MagnitudeSolver(1)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", SOLVERS)
def test_capabilities_are_described(name):
    solver = get_solver(name)
    assert solver.name == name and solver.capabilities.description
    assert solver.capabilities.exact == (name == "brute_force")


@pytest.mark.parametrize("solver", SOLVERS)
def test_dense_fisher_problem_gives_the_same_answer(solver):
    # the same block held as F = XᵀX instead of X: every solver sees the same E(S)
    thin = make_problem(9, 4, 21, "ill", with_gradient=True)
    dense = BlockProblem(thin.weights, 4, thin.damping, fisher=thin.factor.T @ thin.factor, gradient=thin.gradient)
    a, b = solve_block(thin, solver), solve_block(dense, solver)
    assert b.objective == pytest.approx(support_objective(thin, b.support), rel=1e-7, abs=1e-9)
    if solver != "iht":  # iht's path depends on the factor it multiplies with (X vs the eigen-factor of F)
        assert np.array_equal(a.support, b.support)
