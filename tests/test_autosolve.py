"""engine.autosolve.choose_solver: the solver `cbs solve` picks when none is named."""

import math

import numpy as np
import pytest

from engine.autosolve import BNB_MAX_SIZE, BRUTE_FORCE_MAX_SUPPORTS, choose_solver
from engine.options import SolveOptions
from engine.solve import solve_block
from engine.solvers.registry import get_solver
from random_problems import make_problem

CASES = [
    # (n, k, expected solver)
    (10, 5, "brute_force"),  # tiny: C(10, 5) = 252
    (30, 3, "brute_force"),  # n above brute force's default max_size (24) but few supports
    (10, 0, "brute_force"),  # degenerate k = 0
    (30, 15, "bnb"),  # medium: C(30, 15) = 1.6e8 supports
    (BNB_MAX_SIZE, 8, "bnb"),
    (200, 100, "swap"),  # large
    (100, 100, "swap"),  # degenerate k = n above the exact sizes
]


@pytest.mark.parametrize("n, k, expected", CASES)
def test_choice_is_available_accepts_block_and_solves(n, k, expected):
    problem = make_problem(n, k, seed=n + k)
    name, params, reason = choose_solver(problem)
    assert name == expected
    assert isinstance(params, dict) and isinstance(reason, str) and reason and "\n" not in reason
    solver = get_solver(name, **params)
    assert solver.available()
    cap = solver.capabilities
    assert cap.max_size is None or n <= cap.max_size
    result = solve_block(problem, get_solver(name, **params), SolveOptions(time_limit=5))
    assert int(np.count_nonzero(result.support)) == k
    assert np.isfinite(result.objective)


def test_rule_thresholds():
    for n in range(1, 41):
        for k in (0, 1, 2, n // 2, n - 1, n):
            if not 0 <= k <= n:
                continue
            name, params, _ = choose_solver(make_problem(n, k, seed=0, N=4))
            if math.comb(n, k) <= BRUTE_FORCE_MAX_SUPPORTS:
                assert name == "brute_force", (n, k)
                assert get_solver(name, **params).capabilities.max_size >= n
            else:
                assert name == "bnb", (n, k)


def test_tiny_block_matches_brute_force():
    for seed, kind in ((0, "well"), (1, "ill")):
        problem = make_problem(10, 4, seed=seed, kind=kind, with_gradient=seed == 1)
        name, params, _ = choose_solver(problem)
        chosen = solve_block(problem, get_solver(name, **params), SolveOptions(time_limit=5))
        oracle = solve_block(problem, get_solver("brute_force"), SolveOptions())
        assert chosen.objective == pytest.approx(oracle.objective, rel=1e-9, abs=1e-12)


def test_medium_block_bnb_is_exact_against_brute_force():
    # n = 21, k = 10: C(21, 10) = 352,716 > 200,000 -> bnb; brute force is still the oracle
    problem = make_problem(21, 10, seed=3)
    name, params, _ = choose_solver(problem)
    assert name == "bnb"
    chosen = solve_block(problem, get_solver(name, **params), SolveOptions(time_limit=30))
    oracle = solve_block(problem, get_solver("brute_force"), SolveOptions())
    assert chosen.objective == pytest.approx(oracle.objective, rel=1e-9, abs=1e-12)


def test_large_layer_does_not_compute_huge_binomial():
    # a layer-sized block: the choice must be immediate (no C(n, k) of 10⁴ digits) and never an error
    rng = np.random.default_rng(0)
    from formulations.problem import BlockProblem

    n = 20_000
    problem = BlockProblem(rng.standard_normal(n), n // 2, 1e-3, factor=rng.standard_normal((4, n)) / 2)
    name, params, reason = choose_solver(problem)
    assert name == "swap" and params == {}
    assert str(n) in reason


def test_rejects_non_problem():
    from engine.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError):
        choose_solver("block.npz")
