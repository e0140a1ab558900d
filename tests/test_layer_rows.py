"""Rows of one layer as blocks that share a factor: with_weights, the shared H⁻¹, and the batched refit
against the numpy float64 reference (``optimal_update``)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.solve import solve_block
from engine.solvers.woodfisher import hessian_inverse
from engine.update import shared_factor_update
from formulations import objective as obj
from formulations.errors import InvalidProblemError
from formulations.problem import BlockProblem, eigen_factor


def _layer(d_out=7, d_in=12, T=40, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(T, d_in)) * rng.uniform(0.2, 2.0, size=d_in)
    H = A.T @ A / T
    W = rng.normal(size=(d_out, d_in))
    lam = 0.01 * float(np.mean(np.diag(H)))
    template = BlockProblem(W[0], d_in // 2, lam, factor=eigen_factor(H))
    rows = [template.with_weights(W[i], f"r{i}") for i in range(d_out)]
    return H, W, rows, rng


def test_rows_share_the_factor_and_one_inverse():
    H, W, rows, _ = _layer()
    assert all(r.factor is rows[0].factor for r in rows)
    assert all(r.shares_rows for r in rows) and not BlockProblem(W[0], 6, 0.1, factor=rows[0].factor).shares_rows
    inv = hessian_inverse(rows[0])
    assert hessian_inverse(rows[3]) is inv  # computed once for the layer
    assert np.allclose(inv, np.linalg.inv(H + rows[0].damping * np.eye(H.shape[0])), atol=1e-10)
    assert not inv.flags.writeable
    lone = BlockProblem(W[0], 6, rows[0].damping, factor=rows[0].factor)
    assert hessian_inverse(lone) is not hessian_inverse(lone)  # a lone block keeps no n×n matrix
    assert np.array_equal(rows[2].weights, W[2]) and rows[2].label == "r2" and rows[2].gradient is None
    # a row's own derived data (y = Xw) is its own
    assert np.allclose(rows[1].target(), rows[1].factor @ W[1]) and np.allclose(rows[2].target(), rows[2].factor @ W[2])


@pytest.mark.parametrize("bad, says", [(np.zeros(5), "shape (12,)"), (np.full(12, np.nan), "finite")])
def test_with_weights_rejects_bad_rows(bad, says):
    _, _, rows, _ = _layer()
    with pytest.raises(InvalidProblemError, match=r"weights"):
        rows[0].with_weights(bad)
    try:
        rows[0].with_weights(bad)
    except InvalidProblemError as exc:
        assert says in str(exc)


def test_shared_update_equals_the_reference_for_mixed_budgets():
    H, W, rows, rng = _layer(d_out=9)
    rows = [r.with_n_keep(int(k)) for r, k in zip(rows, rng.integers(0, 13, size=len(rows)))]
    supports = [rng.permutation(12) < r.n_keep for r in rows]
    got = shared_factor_update(rows, supports, H, max_batch_bytes=8 * 6 * 6 * 2)  # forces several batches
    for r, s, u in zip(rows, supports, got):
        ref = obj.optimal_update(r, s)
        assert np.allclose(u.weights, ref.weights, atol=1e-10, rtol=1e-9)
        assert u.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)
        assert np.allclose(u.residual, ref.residual, atol=1e-10)
        assert np.all(u.weights[~s] == 0)


def test_shared_update_refuses_rows_of_other_layers():
    H, W, rows, _ = _layer()
    other = BlockProblem(W[0], 6, 0.1, factor=eigen_factor(H))
    with pytest.raises(ValueError, match="share one factor"):
        shared_factor_update([rows[0], other], [np.arange(12) < 6] * 2, H)


@pytest.mark.parametrize("solver", ["greedy", "woodfisher", "swap"])
def test_a_row_solves_the_same_alone_or_among_its_layer(solver):
    H, W, rows, _ = _layer(seed=3)
    for i in (0, 4):
        lone = BlockProblem(W[i], 6, rows[0].damping, factor=rows[0].factor.copy())
        a, b = solve_block(rows[i], solver), solve_block(lone, solver)
        assert np.array_equal(a.support, b.support) and a.objective == pytest.approx(b.objective, rel=1e-9)


def test_layerwise_checks_every_row_answer_of_a_plug_in():
    """A plug-in that claims to honour N:M but keeps the first half of each row is refused by name."""
    import torch
    from torch import nn

    from engine.layerwise import prune_layerwise
    from engine.result import SolveResult, Status, Termination
    from engine.solve import SolverError
    from engine.solvers.base import Capabilities, SubsetSolver

    class FirstHalf(SubsetSolver):
        name = "first_half"
        capabilities = Capabilities(patterns=True)

        def solve(self, problem, options, warm_start=None):
            s = np.arange(problem.n) < problem.n_keep
            return SolveResult(support=s, status=Status.FEASIBLE, termination=Termination.COMPLETED)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(SolverError, match="breaks the 2:4 pattern"):
        prune_layerwise(model, ["0.weight"], [torch.randn(16, 8)], pattern=(2, 4), method=FirstHalf())
