"""CBS-S (engine/solvers/local_search.py): RMP start, exact swap gains, accepted moves, pass selection."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidOptionError
from engine.options import SolveOptions
from engine.result import Status, Termination
from engine.solve import solve_block
from engine.solvers.base import top_k_support
from engine.solvers.local_search import (
    CBSSolver,
    SelectionState,
    column_major,
    randomized_magnitude_support,
    rmp_chunk_quotas,
)
from formulations.objective import selection_objective
from formulations.problem import BlockProblem


def make_problem(seed: int, n: int = 12, N: int = 8, k: int | None = None, dtype=np.float64, gradient=False,
                 dense=False, damping=0.05) -> BlockProblem:
    rng = np.random.default_rng(seed)
    # correlated columns make swaps matter
    X = rng.standard_normal((N, n)) @ (np.eye(n) + 0.6 * rng.standard_normal((n, n)))
    w = rng.standard_normal(n)
    k = n // 2 if k is None else k
    g = 0.1 * rng.standard_normal(n) if gradient else None
    if dense:
        return BlockProblem(w, k, damping, fisher=X.T @ X, gradient=g)
    return BlockProblem(w, k, damping, factor=X.astype(dtype), gradient=g)


def random_support(problem: BlockProblem, seed: int) -> np.ndarray:
    mask = np.zeros(problem.n, dtype=bool)
    mask[np.random.default_rng(seed).choice(problem.n, problem.n_keep, replace=False)] = True
    return mask


CASES = [
    dict(seed=s, n=n, N=N, k=k, dtype=dt, gradient=gr, dense=de)
    for s, n, N, k, dt, gr, de in [
        (0, 12, 8, 6, np.float64, False, False),
        (1, 12, 20, 3, np.float64, True, False),
        (2, 10, 5, 7, np.float32, False, False),
        (3, 11, 11, 5, np.float32, True, False),
        (4, 9, 9, 4, np.float64, False, True),
        (5, 12, 3, 2, np.float64, True, True),
        (6, 8, 30, 1, np.float64, False, False),
        (7, 12, 6, 11, np.float64, False, False),
    ]
]


@pytest.mark.parametrize("case", CASES)
def test_feasible_and_no_worse_than_magnitude_and_start(case):
    problem = make_problem(**case)
    result = CBSSolver(epsilon=1e-8).solve(problem, SolveOptions(seed=0))
    assert result.support.dtype == bool and result.support.shape == (problem.n,)
    assert int(result.support.sum()) == problem.n_keep
    assert result.status == Status.FEASIBLE and result.solver == "cbs"
    f = selection_objective(problem, result.support)
    magnitude = top_k_support(np.abs(problem.weights), problem.n_keep)
    tol = 1e-9 * max(1.0, abs(f))
    assert f <= selection_objective(problem, magnitude) + tol
    assert f <= result.extra["pass_objectives"][0] + tol
    assert result.extra["pass_objectives"][result.extra["best_pass"]] == pytest.approx(f, rel=1e-9, abs=1e-12)
    assert result.iterations == result.extra["swaps"] == sum(result.extra["pass_swaps"])
    assert len(result.extra["rmp_losses"]) == 50


@pytest.mark.parametrize("case", CASES[:6])
def test_every_accepted_swap_lowers_the_objective_by_its_gain(case):
    problem = make_problem(**case)
    epsilon = 1e-3
    start = random_support(problem, case["seed"] + 100)  # a poor start, so that swaps happen
    result = CBSSolver(epsilon=epsilon, record_moves=True).solve(problem, SolveOptions(), warm_start=start)
    assert result.extra["rmp_score"] == "warm_start"
    support = start.copy()
    f = selection_objective(problem, support)
    assert result.extra["pass_objectives"][0] == pytest.approx(f, rel=1e-9, abs=1e-12)
    for _, p, q, gain in result.extra["moves"]:
        assert not support[p] and support[q]
        support[p], support[q] = True, False
        f_new = selection_objective(problem, support)
        assert f - f_new == pytest.approx(gain, rel=1e-7, abs=1e-9)
        assert 2.0 * (f - f_new) >= epsilon * (1 - 1e-9) and f - f_new > 0
        f = f_new
    # without evaluate the objective only falls, so the last pass is the best
    np.testing.assert_array_equal(support, result.support)


def test_search_improves_a_poor_start():
    problem = make_problem(0, n=12, N=8, k=6)
    start = random_support(problem, 3)
    result = CBSSolver(epsilon=1e-8).solve(problem, SolveOptions(), warm_start=start)
    assert result.extra["swaps"] > 0
    assert selection_objective(problem, result.support) < selection_objective(problem, start)
    assert result.termination in (Termination.LOCAL_OPTIMUM, Termination.ITERATION_LIMIT)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gradient", [False, True])
def test_incremental_gain_equals_recomputation(dtype, gradient):
    problem = make_problem(11, n=12, N=7, k=5, dtype=dtype, gradient=gradient, damping=0.3)
    rng = np.random.default_rng(0)
    state = SelectionState(problem, random_support(problem, 1))
    for _ in range(25):
        p = int(rng.choice(np.flatnonzero(~state.kept)))
        q = int(rng.choice(np.flatnonzero(state.kept)))
        before = selection_objective(problem, state.kept)
        assert state.objective() == pytest.approx(before, rel=1e-10, abs=1e-12)
        # the single moves, then the swap with its cross term
        a, b, gain = state.restore_gain(p), state.prune_cost(q), state.swap_gain(p, q)
        restored = state.kept.copy()
        restored[p] = True
        pruned = state.kept.copy()
        pruned[q] = False
        assert before - selection_objective(problem, restored) == pytest.approx(a, rel=1e-9, abs=1e-10)
        assert selection_objective(problem, pruned) - before == pytest.approx(b, rel=1e-9, abs=1e-10)
        state.swap(p, q)
        after = selection_objective(problem, state.kept)
        assert before - after == pytest.approx(gain, rel=1e-9, abs=1e-10)
        assert state.objective() == pytest.approx(after, rel=1e-10, abs=1e-12)


def test_swap_gain_rejects_wrong_sides():
    problem = make_problem(0)
    state = SelectionState(problem, top_k_support(np.abs(problem.weights), problem.n_keep))
    p = int(np.flatnonzero(~state.kept)[0])
    q = int(np.flatnonzero(state.kept)[0])
    with pytest.raises(ValueError):
        state.swap_gain(q, p)


def test_seeded_runs_are_deterministic():
    problem = make_problem(3, n=40, N=15, k=12, dtype=np.float32)

    def run(seed):
        r = CBSSolver(record_moves=True, epsilon=1e-8).solve(problem, SolveOptions(seed=seed))
        extra = {key: value for key, value in r.extra.items() if key != "timing"}
        return r.support, extra

    s1, e1 = run(5)
    s2, e2 = run(5)
    np.testing.assert_array_equal(s1, s2)
    assert e1 == e2
    _, e3 = run(6)
    assert e3["rmp_losses"][0] == e1["rmp_losses"][0]  # trial 0 (magnitude) does not depend on the seed
    assert e3["rmp_losses"] != e1["rmp_losses"]


def test_evaluate_chooses_among_rmp_masks_and_passes():
    problem = make_problem(0, n=12, N=8, k=6)
    calls: list[tuple[np.ndarray, float]] = []

    def evaluate(mask):  # prefers *high* selection objective: the choice must follow it, not f
        value = -selection_objective(problem, mask)
        calls.append((mask.copy(), value))
        return value

    solver = CBSSolver(rmp_trials=10, epsilon=1e-8)
    result = solver.solve(problem, SolveOptions(evaluate=evaluate))
    extra = result.extra
    assert extra["rmp_score"] == "evaluate"
    assert len(calls) == 10 + extra["passes"]
    assert extra["rmp_losses"] == [v for _, v in calls[:10]]
    assert extra["pass_losses"][1:] == [v for _, v in calls[10:]]
    best = min(range(len(calls)), key=lambda i: calls[i][1])
    np.testing.assert_array_equal(result.support, calls[best][0])
    # passes lower f, so an evaluate that rewards high f keeps the start
    assert extra["best_pass"] == 0


def test_evaluate_equal_to_the_objective_selects_the_lowest_pass():
    problem = make_problem(2, n=12, N=5, k=4)
    start = random_support(problem, 9)
    result = CBSSolver(epsilon=1e-8).solve(
        problem, SolveOptions(evaluate=lambda m: selection_objective(problem, m)), warm_start=start
    )
    extra = result.extra
    np.testing.assert_allclose(extra["pass_losses"], extra["pass_objectives"], rtol=1e-9, atol=1e-12)
    assert extra["best_pass"] == int(np.argmin(extra["pass_losses"]))
    assert selection_objective(problem, result.support) == pytest.approx(min(extra["pass_losses"]))


def test_rmp_trial_zero_is_magnitude():
    problem = make_problem(4, n=50, N=10, k=17)
    magnitude = top_k_support(np.abs(problem.weights), problem.n_keep)
    result = CBSSolver(rmp_trials=1, max_passes=0).solve(problem, SolveOptions(seed=3))
    np.testing.assert_array_equal(result.support, magnitude)
    assert result.extra["rmp_best_trial"] == 0
    assert result.extra["rmp_losses"] == [pytest.approx(selection_objective(problem, magnitude))]
    seen = []
    CBSSolver(rmp_trials=3, max_passes=0).solve(problem, SolveOptions(evaluate=lambda m: seen.append(m) or 0.0))
    np.testing.assert_array_equal(seen[0], magnitude)


def test_rmp_masks_keep_the_top_of_each_chunk():
    n, k = 103, 31
    w = np.random.default_rng(0).standard_normal(n)
    size, quotas = rmp_chunk_quotas(n, k)
    assert size == 11 and quotas.size == 10 and quotas.sum() == k  # ⌊√103⌋ = 10 chunks of ⌈103/10⌉
    assert set(quotas[:-1].tolist()) <= {3, 4}  # ⌊11·31/103⌋ = 3, ⌈·⌉ = 4
    assert quotas[-1] in (1, 2)  # the last chunk has 103 − 99 = 4 weights: ⌊4·31/103⌋ = 1
    for seed in range(5):
        mask = randomized_magnitude_support(w, k, np.random.default_rng(seed))
        perm = np.random.default_rng(seed).permutation(n)
        assert mask.sum() == k
        for c, q in enumerate(quotas):
            chunk = perm[c * size : (c + 1) * size]
            kept, dropped = chunk[mask[chunk]], chunk[~mask[chunk]]
            assert kept.size == q
            if kept.size and dropped.size:
                assert np.abs(w[kept]).min() >= np.abs(w[dropped]).max()


@pytest.mark.parametrize("n", [1, 2, 5, 17, 1000, 32360])
def test_rmp_quotas_sum_to_k_and_fit(n):
    for k in sorted({0, 1, n // 10, n // 2, n - 1, n}):
        size, quotas = rmp_chunk_quotas(n, k)
        lengths = np.minimum(size, n - np.arange(0, n, size))
        assert quotas.sum() == k and (quotas >= 0).all() and (quotas <= lengths).all()


@pytest.mark.parametrize(
    "argument, value",
    [
        ("rmp_trials", 0), ("rmp_trials", 2.5), ("epsilon", -1e-3), ("epsilon", float("nan")), ("epsilon", "x"),
        ("rho", 0), ("tau", -1), ("max_passes", -1), ("max_passes", True), ("patience", 0), ("record_moves", "yes"),
    ],
)
def test_bad_parameters_name_the_argument(argument, value):
    with pytest.raises(InvalidOptionError, match=f"'{argument}'"):
        CBSSolver(**{argument: value})


def test_bad_warm_start_is_rejected():
    problem = make_problem(0)
    with pytest.raises(InvalidOptionError, match="'warm_start'"):
        CBSSolver().solve(problem, SolveOptions(), warm_start=np.ones(problem.n, dtype=bool))


def test_time_limit_returns_a_feasible_incumbent():
    problem = make_problem(1, n=200, N=30, k=40, dtype=np.float32)
    result = CBSSolver().solve(problem, SolveOptions(time_limit=1e-9))
    assert result.termination == Termination.TIME_LIMIT
    assert int(result.support.sum()) == 40
    assert result.extra["rmp_losses"]  # trial 0 always runs


def test_medium_problem_objective_tracks_recomputation():
    problem = make_problem(8, n=400, N=60, k=80, dtype=np.float32, gradient=True)
    result = CBSSolver(rmp_trials=5, epsilon=1e-6).solve(problem, SolveOptions(seed=1))
    assert result.extra["swaps"] > 0
    f = selection_objective(problem, result.support)
    assert result.extra["pass_objectives"][result.extra["best_pass"]] == pytest.approx(f, rel=1e-9)
    assert f <= selection_objective(problem, top_k_support(np.abs(problem.weights), 80))


def test_trivial_budgets():
    for k in (0, 12):
        problem = make_problem(0, k=k)
        result = CBSSolver().solve(problem, SolveOptions())
        assert int(result.support.sum()) == k and result.termination == Termination.COMPLETED


def test_plateau_rule_matches_the_official_stop():
    solver = CBSSolver(patience=2)
    assert not solver._plateau([3.0, 2.0])
    assert not solver._plateau([3.0, 2.0, 2.5])  # best only one pass ago
    assert solver._plateau([3.0, 2.0, 2.5, 2.6])  # worse, and the best is two passes back
    assert not solver._plateau([3.0, 2.0, 2.5, 1.0])
    assert not CBSSolver(patience=None)._plateau([1.0, 2.0, 3.0, 4.0])


def test_column_major_matches_transpose():
    X = np.random.default_rng(0).standard_normal((37, 2051)).astype(np.float32)
    XT = column_major(X, block=16)
    assert XT.flags.c_contiguous
    np.testing.assert_array_equal(XT, X.T)
    F = np.asfortranarray(X)
    assert np.shares_memory(column_major(F), F)


def test_through_solve_block_and_registry():
    problem = make_problem(5, n=12, N=9, k=5, gradient=True)
    result = solve_block(problem, "cbs", SolveOptions(seed=2), rmp_trials=8)
    assert result.solver == "cbs" and int(result.support.sum()) == 5
    assert np.isfinite(result.objective)
