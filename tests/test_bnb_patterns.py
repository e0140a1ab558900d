"""bnb proves N:M optima: equal to brute force over pattern supports on tiny blocks, valid bounds when
stopped early, and the node helpers of formulations.patterns against direct loops."""

from __future__ import annotations

import numpy as np
import pytest

from engine.solve import UnprovenOptimalityWarning
from engine.result import Status
from engine.solve import solve_block
from formulations.patterns import node_groups, pattern_violation, propagate, top_within, within_thresholds
from formulations.problem import BlockProblem


def _block(n, pattern, seed, N_rows=None):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N_rows or 2 * n, n)) * rng.uniform(0.3, 2.0, size=n)
    g = rng.normal(size=n) * 0.1 if seed % 2 else None
    return BlockProblem(rng.normal(size=n), n // pattern[1] * pattern[0], 0.05, factor=X, gradient=g,
                        pattern=pattern)


@pytest.mark.parametrize("n, pattern", [(16, (2, 4)), (24, (2, 4)), (16, (1, 4)), (16, (4, 8)), (18, (2, 3))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bnb_equals_brute_force_over_pattern_supports(n, pattern, seed):
    p = _block(n, pattern, seed)
    exact, brute = solve_block(p, "bnb"), solve_block(p, "brute_force")
    assert exact.status == Status.OPTIMAL and exact.gap == pytest.approx(0.0, abs=1e-8)
    assert exact.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-12)
    assert pattern_violation(exact.support, pattern) is None


def test_a_stopped_search_keeps_the_pattern_and_a_valid_bound():
    p = _block(24, (2, 4), 3)
    optimum = solve_block(p, "brute_force").objective
    with pytest.warns(UnprovenOptimalityWarning, match="before proving optimality"):
        early = solve_block(p, "bnb", max_nodes=2)
    assert pattern_violation(early.support, (2, 4)) is None
    assert early.bound <= optimum * (1 + 1e-9) and early.objective >= optimum * (1 - 1e-12)


def test_node_helpers_against_loops():
    rng = np.random.default_rng(0)
    pattern = (2, 4)
    keep = np.zeros(16, dtype=bool)
    keep[[0, 1, 4]] = True  # group 0 full, group 1 has one
    out = {2, 5, 8, 9}  # group 2 lost two: it needs both of 10, 11
    free = np.array([i for i in range(16) if not keep[i] and i not in out])
    groups, need = node_groups(keep, free, pattern)
    assert list(need) == [0, 1, 2, 2]
    fin, fout = propagate(keep, free, pattern)
    assert set(free[fout]) == {3} and set(free[fin]) == {10, 11}
    bad = keep.copy()
    bad[2] = True  # three kept in group 0
    assert propagate(bad, free[free != 2], pattern) is None
    scores = rng.normal(size=free.size)
    chosen, low, high = within_thresholds(scores, groups, need)
    assert np.array_equal(chosen, top_within(scores, groups, need))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        best = idx[np.argsort(-scores[idx], kind="stable")[: need[g]]]
        assert set(np.flatnonzero(chosen)) & set(idx) == set(best)
        if 0 < need[g] < idx.size:
            others = idx[~np.isin(idx, best)]
            assert low[idx[0]] == scores[best].min() and high[idx[0]] == scores[others].max()
