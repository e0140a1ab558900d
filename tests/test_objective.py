"""Tests of formulations.objective (the update, E(S), the dual bound) and of BlockProblem's validation.

The oracle for E(S) is independent linear algebra: ``np.linalg.lstsq`` on the augmented system
[X_S; √λ I] v_S ≈ [y; √λ (w_S − g_S/λ)] and enumeration of all supports with itertools.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formulations.objective as objective
from formulations.errors import InvalidProblemError
from formulations.objective import (
    MEMO_SIZE,
    IllConditionedWarning,
    as_support,
    dual_bound,
    dual_value,
    optimal_update,
    quadratic_model,
    UpdateMemo,
    remembered_update,
    support_objective,
)
from formulations.problem import BlockProblem
from random_problems import make_problem




def brute_optimum(problem: BlockProblem) -> float:
    """min over all |S| = k of E(S), by itertools and support_objective."""
    n, k = problem.n, problem.n_keep
    return min(support_objective(problem, np.array(c, dtype=np.intp)) for c in itertools.combinations(range(n), k))


def lstsq_update(problem: BlockProblem, support: np.ndarray) -> np.ndarray:
    """v (n,) from np.linalg.lstsq on the augmented system (the independent oracle of the update)."""
    X = problem.factor_matrix().astype(np.float64)
    idx = np.flatnonzero(support)
    lam, w = problem.damping, problem.weights
    g = problem.gradient if problem.gradient is not None else np.zeros(problem.n)
    v = np.zeros(problem.n)
    if idx.size:
        A = np.vstack([X[:, idx], np.sqrt(lam) * np.eye(idx.size)])
        b = np.concatenate([X @ w, np.sqrt(lam) * (w[idx] - g[idx] / lam)])
        v[idx] = np.linalg.lstsq(A, b, rcond=None)[0]
    return v


def random_support(n: int, k: int, seed: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed + 1000).choice(n, size=k, replace=False)] = True
    return mask


# --------------------------------------------------------------------------- the update


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(1, 10),
    N=st.integers(1, 14),
    lam=st.sampled_from([1e-3, 1e-1, 1.0, 10.0]),
    with_gradient=st.booleans(),
    data=st.data(),
)
def test_update_equals_lstsq_on_augmented_system(seed, n, N, lam, with_gradient, data):
    k = data.draw(st.integers(0, n), label="k")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, n))
    w = rng.standard_normal(n)
    g = rng.standard_normal(n) if with_gradient else None
    problem = BlockProblem(w, k, lam, factor=X, gradient=g)
    S = random_support(n, k, seed)
    sol = optimal_update(problem, S)
    expected = lstsq_update(problem, S)
    scale = max(1.0, float(np.linalg.norm(expected)))
    assert np.linalg.norm(sol.weights - expected) <= 1e-8 * scale
    assert np.all(sol.weights[~S] == 0.0)
    assert sol.objective == pytest.approx(quadratic_model(problem, expected), rel=1e-8, abs=1e-10)
    assert np.allclose(sol.residual, X @ (sol.weights - w), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_woodbury_path_equals_cholesky_path(seed, with_gradient):
    # N < k takes the Woodbury N×N solve; the same block given as a dense Fisher (factor n×n) takes Cholesky
    n, k, N = 12, 9, 4
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, n))
    w = rng.standard_normal(n)
    g = rng.standard_normal(n) if with_gradient else None
    thin = BlockProblem(w, k, 0.05, factor=X, gradient=g)
    dense = BlockProblem(w, k, 0.05, fisher=X.T @ X, gradient=g)
    S = random_support(n, k, seed)
    a, b = optimal_update(thin, S), optimal_update(dense, S)
    assert a.method == "woodbury" and b.method == "cholesky"
    assert np.allclose(a.weights, b.weights, rtol=1e-9, atol=1e-11)
    assert a.objective == pytest.approx(b.objective, rel=1e-9, abs=1e-12)


def test_ill_conditioned_fallback_warns_and_matches_lstsq():
    # two identical columns and λ = 1e-14: the k×k system has condition ~1e14 > COND_LIMIT
    rng = np.random.default_rng(0)
    N, n = 20, 6
    X = rng.standard_normal((N, n))
    X[:, 1] = X[:, 0]
    problem = BlockProblem(rng.standard_normal(n), 4, 1e-14, factor=X)
    S = np.array([True, True, True, True, False, False])
    with pytest.warns(IllConditionedWarning):
        sol = optimal_update(problem, S)
    assert sol.method == "lstsq"
    expected = lstsq_update(problem, S)
    assert sol.objective == pytest.approx(quadratic_model(problem, expected), rel=1e-6, abs=1e-10)
    assert np.allclose(X @ (sol.weights - problem.weights), X @ (expected - problem.weights), atol=1e-6)


def test_trivial_supports():
    problem = make_problem(6, 0, 0)
    sol = optimal_update(problem, np.zeros(6, dtype=bool))
    assert sol.method == "trivial" and np.all(sol.weights == 0)
    assert sol.objective == pytest.approx(quadratic_model(problem, np.zeros(6)))
    full = optimal_update(problem.with_n_keep(6), np.ones(6, dtype=bool))
    assert full.objective == pytest.approx(0.0, abs=1e-14)  # g = 0: keeping everything costs nothing


def _float32_block(seed: int, N: int, n: int, k: int, with_gradient: bool, lam: float = 1e-3) -> BlockProblem:
    # gradient-like: a few strong directions plus noise, so X_S X_Sᵀ + λI is far from well-conditioned
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((N, 8)) @ rng.standard_normal((8, n)) + 0.05 * rng.standard_normal((N, n))) / np.sqrt(N)
    g = rng.standard_normal(n) * 1e-3 if with_gradient else None
    return BlockProblem(rng.standard_normal(n), k, lam, factor=X.astype(np.float32), gradient=g)


@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("shape", [(1100, 3000, 2200), (2500, 1600, 1200)], ids=["woodbury", "cholesky"])
def test_mixed_precision_solve_equals_the_float64_solve(shape, with_gradient):
    N, n, k = shape
    problem = _float32_block(5, N, n, k, with_gradient)
    S = random_support(n, k, 5)
    sol = optimal_update(problem, S)
    assert sol.method == ("woodbury+cg" if k > N else "cholesky+cg")
    assert np.all(sol.weights[~S] == 0.0)
    # the oracle: the augmented least-squares system solved by SVD in float64 (condition number ~1e6 here)
    expected = lstsq_update(problem, S)
    error = np.linalg.norm(sol.weights - expected) / np.linalg.norm(expected)
    assert error <= 1e-8
    # and no less accurate than the float64 Cholesky it replaces (the Woodbury form loses digits to 1/λ)
    plain, method = objective._float64_solve(problem, np.flatnonzero(S), problem.target())
    assert method == ("woodbury" if k > N else "cholesky")
    assert error <= 10 * max(np.linalg.norm(plain - expected[S]) / np.linalg.norm(expected), 1e-12)
    assert sol.objective == pytest.approx(quadratic_model(problem, sol.weights), rel=1e-9, abs=1e-12)


def test_mixed_precision_solve_factors_in_float64_when_float32_cannot(monkeypatch):
    N, n, k = 1100, 2400, 2000
    problem = _float32_block(8, N, n, k, with_gradient=True)
    S = random_support(n, k, 8)
    real = objective.lapack.spotrf
    calls = []

    def failing(a, **kw):  # what spotrf reports for a float32 Gram too ill-conditioned to factor
        calls.append(a.shape)
        c, _ = real(a, **kw)
        return c, 3

    monkeypatch.setattr(objective.lapack, "spotrf", failing)
    sol = optimal_update(problem, S)
    assert calls == [(N, N)] and sol.method == "woodbury+cg"
    expected = lstsq_update(problem, S)
    assert np.linalg.norm(sol.weights - expected) <= 1e-8 * np.linalg.norm(expected)


def test_mixed_precision_solve_falls_back_to_float64_when_cg_stops_short(monkeypatch):
    N, n, k = 1100, 2400, 2000
    problem = _float32_block(6, N, n, k, with_gradient=False)
    S = random_support(n, k, 6)
    monkeypatch.setattr(objective, "MIXED_MAX_ITER", 0)
    sol = optimal_update(problem, S)
    assert sol.method == "woodbury"
    expected = lstsq_update(problem, S)
    assert np.linalg.norm(sol.weights - expected) <= 1e-7 * np.linalg.norm(expected)


def test_small_or_float64_blocks_keep_the_float64_solve():
    small = _float32_block(7, 300, 800, 500, with_gradient=False)
    assert optimal_update(small, random_support(800, 500, 7)).method == "woodbury"
    big64 = BlockProblem(small.weights, 500, 1e-3, factor=np.asarray(small.factor, dtype=np.float64))
    assert optimal_update(big64, random_support(800, 500, 8)).method == "woodbury"


def test_recent_supports_are_remembered_and_only_for_the_same_block():
    n, k, N, lam = 12, 6, 5, 0.1
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, n))
    w = rng.standard_normal(n)
    g = rng.standard_normal(n)
    problem = BlockProblem(w, k, lam, factor=X, gradient=g)
    S = random_support(n, k, 1)
    memo = UpdateMemo()
    assert remembered_update(problem, S, memo) is None
    assert remembered_update(problem, S, None) is None
    first = optimal_update(problem, S, memo)
    assert len(memo) == 1
    first.weights[:] = 99.0  # what a caller gets is its own copy
    first.residual[:] = 99.0
    expected = lstsq_update(problem, S)
    again = optimal_update(problem.with_n_keep(2), S, memo)  # another budget of the block: same memo entry
    assert len(memo) == 1
    assert np.linalg.norm(again.weights - expected) <= 1e-8 * max(1.0, float(np.linalg.norm(expected)))
    assert np.allclose(again.residual, X @ (again.weights - w), rtol=1e-10, atol=1e-10)
    assert remembered_update(problem, np.flatnonzero(S), memo) is not None  # indices name the same support

    # the same memo under another gradient or λ: never the remembered answer
    plain = problem.with_gradient(None)
    assert remembered_update(plain, S, memo) is None
    sol = optimal_update(plain, S, memo)
    assert np.allclose(sol.weights, lstsq_update(plain, S), rtol=1e-8, atol=1e-10)
    other_lam = BlockProblem(w, k, 2.0, factor=X, gradient=g)
    assert remembered_update(other_lam, S, memo) is None
    assert np.allclose(optimal_update(other_lam, S, memo).weights, lstsq_update(other_lam, S), rtol=1e-8, atol=1e-10)

    # only the last MEMO_SIZE supports are kept
    for seed in range(10, 10 + MEMO_SIZE):
        optimal_update(problem, random_support(n, k, seed), memo)
    assert len(memo) == MEMO_SIZE
    assert remembered_update(problem, S, memo) is None
    with pytest.raises(InvalidProblemError):
        UpdateMemo(0)


def test_a_block_problem_holds_no_memo_state(monkeypatch):
    calls = []
    real = objective._solve_support

    def counting(problem, S):
        calls.append(1)
        return real(problem, S)

    monkeypatch.setattr(objective, "_solve_support", counting)
    problem = make_problem(10, 4, 0, "well", True)
    S = random_support(10, 4, 0)
    a = optimal_update(problem, S)
    b = optimal_update(problem, S)
    assert len(calls) == 2  # without a memo nothing is remembered
    assert a.objective == b.objective and np.array_equal(a.weights, b.weights)
    memo = UpdateMemo()
    optimal_update(problem, S, memo)
    optimal_update(problem, S, memo)
    optimal_update(problem.with_n_keep(3), S, memo)
    assert len(calls) == 3  # with a memo: one solve
    optimal_update(problem, S, UpdateMemo())  # a fresh memo knows nothing
    assert len(calls) == 4

    names = {f.name for f in dataclasses.fields(BlockProblem)}
    assert names == {"weights", "n_keep", "damping", "factor", "fisher", "gradient", "label", "pattern"}
    assert not any("cache" in name or "memo" in name for name in names)
    with pytest.raises(TypeError):
        BlockProblem(problem.weights, 4, 1.0, factor=problem.factor, _cache={})  # type: ignore[call-arg]
    # derived data (pure functions of the data) are shared by the copies with another k or g, and read-only
    y = problem.target()
    assert problem.with_n_keep(2).target() is y and problem.with_gradient(None).target() is y
    assert not y.flags.writeable
    assert dataclasses.replace(problem, n_keep=2).target() is not y  # a new problem derives its own
    assert "_derived" not in repr(problem)


# --------------------------------------------------------------------------- the dual


@pytest.mark.parametrize("kind", ["well", "ill"])
@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_dual_value_is_tight_at_the_support_residual(kind, with_gradient, seed):
    problem = make_problem(9, 4, seed, kind, with_gradient)
    S = random_support(9, 4, seed)
    sol = optimal_update(problem, S)
    value = dual_value(problem, sol.residual, S)
    assert abs(value - sol.objective) <= 1e-10 * max(1.0, abs(sol.objective))


@pytest.mark.parametrize("kind", ["well", "ill"])
@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_dual_bound_below_brute_force_optimum(kind, with_gradient, k, seed):
    problem = make_problem(9, k, seed, kind, with_gradient)
    optimum = brute_optimum(problem)
    tol = 1e-9 * max(1.0, abs(optimum))
    rng = np.random.default_rng(seed)
    assert dual_bound(problem) <= optimum + tol
    assert dual_bound(problem, alpha=rng.standard_normal(problem.n_samples)) <= optimum + tol
    for j in range(5):
        assert dual_bound(problem, support=random_support(9, k, seed * 10 + j)) <= optimum + tol


# --------------------------------------------------------------------------- BlockProblem rejections


def _ok_args():
    rng = np.random.default_rng(0)
    return dict(weights=rng.standard_normal(4), n_keep=2, damping=0.1, factor=rng.standard_normal((3, 4)))


def _rejects(argument: str, **changes) -> None:
    args = _ok_args()
    args.update(changes)
    with pytest.raises(InvalidProblemError, match=f"'{argument}'"):
        BlockProblem(**args)


def test_rejects_empty_weights():
    _rejects("weights", weights=np.zeros(0), factor=np.zeros((3, 0)))


def test_rejects_2d_weights():
    _rejects("weights", weights=np.zeros((2, 2)))


def test_rejects_nan_weights():
    _rejects("weights", weights=np.array([1.0, np.nan, 0.0, 2.0]))


def test_rejects_nan_factor():
    X = np.ones((3, 4))
    X[1, 2] = np.inf
    _rejects("factor", factor=X)


def test_rejects_n_keep_above_n():
    _rejects("n_keep", n_keep=5)


def test_rejects_negative_n_keep():
    _rejects("n_keep", n_keep=-1)


def test_rejects_non_integer_n_keep():
    _rejects("n_keep", n_keep=2.0)


def test_rejects_boolean_n_keep():
    _rejects("n_keep", n_keep=True)


def test_rejects_zero_damping():
    _rejects("damping", damping=0.0)


def test_rejects_negative_damping():
    _rejects("damping", damping=-1e-3)


def test_rejects_non_numeric_damping():
    _rejects("damping", damping="big")


def test_rejects_both_factor_and_fisher():
    args = _ok_args()
    with pytest.raises(InvalidProblemError, match="'factor'.*'fisher'"):
        BlockProblem(**args, fisher=np.eye(4))


def test_rejects_neither_factor_nor_fisher():
    args = _ok_args()
    del args["factor"]
    with pytest.raises(InvalidProblemError, match="'factor'.*'fisher'"):
        BlockProblem(**args)


def test_rejects_factor_with_wrong_columns():
    _rejects("factor", factor=np.ones((3, 5)))


def test_rejects_one_dimensional_factor():
    _rejects("factor", factor=np.ones(4))


def test_rejects_fisher_with_wrong_shape():
    args = _ok_args()
    del args["factor"]
    with pytest.raises(InvalidProblemError, match="'fisher'"):
        BlockProblem(**args, fisher=np.eye(3))


def test_rejects_asymmetric_fisher():
    args = _ok_args()
    del args["factor"]
    F = np.eye(4)
    F[0, 1] = 0.5
    with pytest.raises(InvalidProblemError, match="'fisher'.*symmetric"):
        BlockProblem(**args, fisher=F)


def test_rejects_gradient_with_wrong_shape():
    _rejects("gradient", gradient=np.ones(3))


def test_rejects_nan_gradient():
    _rejects("gradient", gradient=np.array([0.0, np.nan, 0.0, 0.0]))


def test_accepts_float32_factor_and_is_immutable():
    args = _ok_args()
    args["factor"] = args["factor"].astype(np.float32)
    problem = BlockProblem(**args)
    assert problem.factor.dtype == np.float32
    with pytest.raises(ValueError):
        problem.weights[0] = 1.0


# --------------------------------------------------------------------------- as_support rejections


@pytest.fixture
def small_problem() -> BlockProblem:
    return BlockProblem(**_ok_args())


def test_as_support_rejects_mask_of_wrong_shape(small_problem):
    with pytest.raises(InvalidProblemError, match="'support'.*shape"):
        as_support(small_problem, np.array([True, False, True]))


def test_as_support_rejects_duplicate_indices(small_problem):
    with pytest.raises(InvalidProblemError, match="'support'.*unique"):
        as_support(small_problem, np.array([1, 1]))


def test_as_support_rejects_out_of_range_indices(small_problem):
    with pytest.raises(InvalidProblemError, match=r"'support'.*\[0, 3\]"):
        as_support(small_problem, np.array([0, 4]))


def test_as_support_rejects_negative_indices(small_problem):
    with pytest.raises(InvalidProblemError, match="'support'"):
        as_support(small_problem, np.array([-1, 2]))


def test_as_support_rejects_wrong_size(small_problem):
    with pytest.raises(InvalidProblemError, match="'support'.*n_keep = 2"):
        as_support(small_problem, np.array([True, True, True, False]))


def test_as_support_rejects_float_array(small_problem):
    with pytest.raises(InvalidProblemError, match="'support'.*dtype"):
        as_support(small_problem, np.array([0.0, 1.0]))


def test_as_support_accepts_indices_and_masks(small_problem):
    a = as_support(small_problem, np.array([3, 0]))
    b = as_support(small_problem, np.array([True, False, False, True]))
    assert a.dtype == bool and np.array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_support(small_problem, np.array([0, 1, 2]), check_size=False).sum() == 3
