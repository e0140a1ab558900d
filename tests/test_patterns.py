"""N:M patterns: parsing, checks, the per-group selection, and the group dual bound against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from formulations.errors import InvalidProblemError
from formulations.objective import as_support, dual_bound, support_objective
from formulations.patterns import (check_pattern, group_top_sum, parse_pattern, pattern_sparsity, pattern_violation,
                                   top_per_group)
from formulations.problem import BlockProblem


def test_parse_and_check():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None and parse_pattern(None) is None
    assert pattern_sparsity((2, 4)) == 0.5 and pattern_sparsity((4, 8)) == 0.5 and pattern_sparsity((1, 4)) == 0.75
    for bad in ("4:4", "5:4", "0:4", "2-4", "a:b", "2:4:8", (2, True)):
        with pytest.raises(ValueError, match="N:M with integers 1 <= N < M"):
            parse_pattern(bad)
    assert check_pattern("2:4", 8, 4) == (2, 4)
    with pytest.raises(InvalidProblemError, match="M dividing the block's 6 weights"):
        check_pattern((2, 4), 6, 3)
    with pytest.raises(InvalidProblemError, match="must be n/M·N = 4"):
        check_pattern((2, 4), 8, 5)


def test_top_per_group_and_violations():
    scores = np.array([4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, -1.0])
    s = top_per_group(scores, (2, 4))
    assert s.tolist() == [True, False, True, False, True, False, True, False]  # tie in group 1: lower index
    assert pattern_violation(s, (2, 4)) is None
    bad = s.copy()
    bad[1], bad[4] = True, False
    assert "group 0 (weights 0..3) keeps 3, not 2" in pattern_violation(bad, (2, 4))
    assert group_top_sum(scores, (2, 4)) == 4 + 3 + 5 + 0


def _brute_pattern(problem: BlockProblem) -> float:
    N, M = problem.pattern
    groups = [list(itertools.combinations(range(g * M, g * M + M), N)) for g in range(problem.n // M)]
    best = np.inf
    for choice in itertools.product(*groups):
        s = np.zeros(problem.n, dtype=bool)
        s[[i for c in choice for i in c]] = True
        best = min(best, support_objective(problem, s))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pattern", [(1, 4), (2, 4), (1, 2)])
def test_group_dual_bound_is_below_the_pattern_optimum(seed, pattern):
    rng = np.random.default_rng(seed)
    n = 8
    X = rng.normal(size=(12, n)) if seed % 2 else rng.normal(size=(3, 2)) @ rng.normal(size=(2, n))
    N, M = pattern
    p = BlockProblem(rng.normal(size=n), n // M * N, 1e-2, factor=X, pattern=pattern)
    opt = _brute_pattern(p)
    s = top_per_group(np.abs(p.weights), pattern)
    assert dual_bound(p) <= opt + 1e-9 * max(1, abs(opt))
    assert dual_bound(p, support=s) <= opt + 1e-9 * max(1, abs(opt))
    # the pattern optimum is no better than the unstructured one with the same k
    free = BlockProblem(p.weights, p.n_keep, p.damping, factor=X)
    assert dual_bound(free, support=s) <= dual_bound(p, support=s) + 1e-12
    with pytest.raises(InvalidProblemError, match=f"must follow the block's {N}:{M} pattern"):
        broken = np.zeros(n, dtype=bool)
        broken[: p.n_keep] = True
        if pattern_violation(broken, pattern) is None:
            broken = np.roll(broken, 1)
        as_support(p, broken)
    assert p.with_n_keep(p.n_keep).pattern == pattern


# ------------------------------------------------------------------ solvers under a pattern (engine side)
def _patterned(seed: int = 0, pattern=(2, 4), n: int = 16) -> BlockProblem:
    rng = np.random.default_rng(seed)
    N, M = pattern
    return BlockProblem(rng.normal(size=n), n // M * N, 1e-2, factor=rng.normal(size=(24, n)), pattern=pattern)


@pytest.mark.parametrize("name", ["magnitude", "woodfisher", "wanda", "swap", "iht", "admm"])
def test_score_solvers_honour_the_pattern_and_carry_a_bound_below_the_optimum(name):
    from engine.solve import solve_block

    p = _patterned(pattern=(2, 4), n=12)
    r = solve_block(p, name)
    assert pattern_violation(r.support, (2, 4)) is None
    assert r.bound is not None and r.bound <= _brute_pattern(p) + 1e-9 and r.bound <= r.objective


def test_wanda_scores_are_weight_times_input_norm():
    from engine.solvers.wanda import wanda_scores

    rng = np.random.default_rng(3)
    A = rng.normal(size=(50, 8))
    w = rng.normal(size=8)
    p = BlockProblem(w, 4, 1e-2, factor=A / np.sqrt(50))  # F = AᵀA/T, the reconstruction H of one row
    expected = np.abs(w) * np.linalg.norm(A, axis=0) / np.sqrt(50)
    np.testing.assert_allclose(wanda_scores(p), expected, rtol=1e-12)


def test_a_solver_without_pattern_support_is_refused_by_name():
    from engine.errors import InvalidOptionError
    from engine.solve import solve_block

    with pytest.raises(InvalidOptionError, match="Solver 'greedy' does not honour N:M patterns.*pattern 2:4.*"
                                                  "Solvers that do: magnitude, woodfisher, wanda, iht, swap"):
        solve_block(_patterned(), "greedy")


@pytest.mark.parametrize("seed", range(8))
def test_swap_under_a_pattern_never_loses_to_its_start_and_often_finds_the_optimum(seed):
    from engine.solve import solve_block

    p = _patterned(seed=seed, pattern=(2, 4), n=12)
    start = solve_block(p, "magnitude").objective
    r = solve_block(p, "swap")
    assert pattern_violation(r.support, (2, 4)) is None and r.objective <= start + 1e-12
    assert r.objective >= _brute_pattern(p) - 1e-9


def test_problem_files_carry_the_pattern(tmp_path, capsys):
    import json

    from engine.cli import main
    from engine.problem_io import load_problem, save_problem

    p = _patterned(pattern=(2, 4), n=12)
    save_problem(tmp_path / "p.npz", p)
    assert load_problem(tmp_path / "p.npz").pattern == (2, 4)
    assert main(["solve", str(tmp_path / "p.npz"), "--solver", "wanda", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["support"]
    s = np.zeros(12, dtype=bool)
    s[kept] = True
    assert pattern_violation(s, (2, 4)) is None


@pytest.mark.parametrize("pattern", [(1, 4), (2, 4), (1, 2)])
def test_brute_force_proves_the_pattern_optimum(pattern):
    from engine.autosolve import choose_solver
    from engine.solve import solve_block

    p = _patterned(seed=5, pattern=pattern, n=8)
    r = solve_block(p, "brute_force")
    assert r.status.value == "optimal" and pattern_violation(r.support, pattern) is None
    assert abs(r.objective - _brute_pattern(p)) <= 1e-9 * max(1, abs(r.objective))
    assert choose_solver(p)[0] == "brute_force"
    assert choose_solver(_patterned(pattern=(2, 4), n=40))[0] == "bnb"  # 6^10 supports: beyond enumeration
    assert choose_solver(_patterned(pattern=(2, 4), n=64))[0] == "swap"


def test_admm_beats_its_magnitude_start_on_average_and_honours_patterns():
    from engine.solve import solve_block

    excess = {"magnitude": [], "admm": []}
    for seed in range(8):
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(6, 3)) @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(6, 12))
        p = BlockProblem(rng.normal(size=12), 6, 1e-2, factor=X)
        opt = min(support_objective(p, s) for s in (
            np.isin(np.arange(12), c) for c in itertools.combinations(range(12), 6)))
        for m in excess:
            excess[m].append(solve_block(p, m).objective / opt - 1)
        q = _patterned(seed=seed, pattern=(2, 4), n=12)
        r = solve_block(q, "admm")
        assert pattern_violation(r.support, (2, 4)) is None and r.objective >= _brute_pattern(q) - 1e-9
    assert np.mean(excess["admm"]) < 0.5 * np.mean(excess["magnitude"])
