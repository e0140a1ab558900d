"""The torch side against numpy float64 references: the batched CBS-U update and the per-sample gradients."""

import numpy as np
import pytest
import torch
from torch import nn

from engine.fisher import per_sample_gradients
from engine.update import batched_update
from formulations.objective import UpdateMemo, optimal_update, remembered_update
from formulations.problem import BlockProblem


def _problem(rng, N, n, k, dtype=np.float64, gradient=False, lam=0.05):
    X = rng.normal(size=(N, n)).astype(dtype)
    g = rng.normal(size=n) if gradient else None
    return BlockProblem(rng.normal(size=n), k, lam, factor=X, gradient=g)


def _support(rng, n, k):
    s = np.zeros(n, dtype=bool)
    s[rng.choice(n, k, replace=False)] = True
    return s


@pytest.mark.parametrize("seed", range(4))
def test_batched_update_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    problems, supports = [], []
    for b in range(9):
        N = [30, 30, 30, 8, 30, 30, 8, 30, 30][b]
        n = 20
        k = int(rng.integers(0, n + 1))
        p = _problem(rng, N, n, k, np.float32 if b % 2 else np.float64, gradient=b % 3 == 0)
        problems.append(p)
        supports.append(_support(rng, n, k))
    # a small batch budget forces several batches and the padding path
    results = batched_update(problems, supports, max_batch_bytes=30 * 20 * 8 * 3)
    for p, s, r in zip(problems, supports, results):
        ref = optimal_update(p, s)
        assert abs(r.objective - ref.objective) <= 1e-6 * max(1.0, abs(ref.objective))
        np.testing.assert_allclose(r.weights, ref.weights, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r.residual, ref.residual, rtol=1e-6, atol=1e-9)
        assert np.all(r.weights[~s] == 0)


def test_update_woodbury_path_used_when_rows_are_few():
    rng = np.random.default_rng(7)
    p = _problem(rng, 5, 40, 30)
    s = _support(rng, 40, 30)
    (r,) = batched_update([p], [s])
    assert r.method == "woodbury"
    ref = optimal_update(p, s)
    assert abs(r.objective - ref.objective) <= 1e-8 * max(1, abs(ref.objective))


@pytest.mark.parametrize("N", [6, 40])
def test_update_reuses_the_reference_solve_of_a_support_it_just_made(N):
    # a solver that scored its final support with the reference, in the block's memo: the update returns that
    # solve, not a second one
    rng = np.random.default_rng(11)
    p = _problem(rng, N, 30, 20, gradient=True)
    s, fresh = _support(rng, 30, 20), _support(rng, 30, 20)
    memo = UpdateMemo()
    ref = optimal_update(p, s, memo)
    assert remembered_update(p, fresh, memo) is None
    r, q = batched_update([p, p.with_n_keep(20)], [s, fresh], [memo, memo])
    assert r.method == ref.method and r.objective == ref.objective
    assert np.array_equal(r.weights, ref.weights) and np.array_equal(r.residual, ref.residual)
    r.weights[:] = 0.0  # the caller's copy
    assert np.array_equal(remembered_update(p, s, memo).weights, ref.weights)
    other = optimal_update(p, fresh)  # the torch solve of the other support still agrees with the reference
    assert abs(q.objective - other.objective) <= 1e-8 * max(1.0, abs(other.objective))
    np.testing.assert_allclose(q.weights, other.weights, rtol=1e-7, atol=1e-10)
    # without the memo the update solves again (in torch) and still agrees
    (plain,) = batched_update([p], [s])
    assert abs(plain.objective - ref.objective) <= 1e-8 * max(1.0, abs(ref.objective))
    (mixed,) = batched_update([p], [s], [None])
    assert abs(mixed.objective - ref.objective) <= 1e-8 * max(1.0, abs(ref.objective))


def test_update_rejects_mismatched_lists():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="supports"):
        batched_update([_problem(rng, 5, 4, 2)], [])
    with pytest.raises(ValueError, match="memos"):
        batched_update([_problem(rng, 5, 4, 2)], [np.array([0, 1])], [])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("fisher_batch", [1, 3])
def test_per_sample_gradients_equal_autograd_loop(fisher_batch, strategy):
    model = _net()
    x = torch.randn(13, 12, dtype=torch.float32)
    y = torch.randint(0, 3, (13,))
    names = ["1.weight", "3.weight"]
    gs = per_sample_gradients(model, names, x, y, fisher_batch=fisher_batch, chunk_size=2, strategy=strategy)
    assert gs.n_rows == 13 // fisher_batch
    for i in range(gs.n_rows):
        model.zero_grad()
        sl = slice(i * fisher_batch, (i + 1) * fisher_batch)
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        for name, mod in (("1.weight", model[1]), ("3.weight", model[3])):
            np.testing.assert_allclose(gs.rows[name][i].numpy(), mod.weight.grad.flatten().numpy(), rtol=1e-5, atol=1e-6)
    assert gs.matrix().shape == (gs.n_rows, 12 * 6 + 6 * 3)


def _conv_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


@pytest.mark.parametrize("fisher_batch", [1, 4])
def test_per_sample_gradients_of_a_conv_net_agree_with_float64_autograd(fisher_batch):
    """Both strategies against a float64 loop of ordinary backward passes (BatchNorm in eval mode)."""
    model = _conv_net()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(12, 2, 5, 5), torch.randint(0, 4, (12,))
    names = ["0.weight", "4.weight"]
    ref = model.double().eval()
    expected = []
    for i in range(12 // fisher_batch):
        sl = slice(i * fisher_batch, (i + 1) * fisher_batch)
        loss = nn.functional.cross_entropy(ref(x[sl].double()), y[sl])
        expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [ref[0].weight, ref[4].weight])]))
    expected = torch.stack(expected).numpy()
    model = model.float().train()
    for strategy in ("vmap", "loop"):
        gs = per_sample_gradients(model, names, x, y, fisher_batch=fisher_batch, strategy=strategy)
        np.testing.assert_allclose(gs.matrix().numpy(), expected, rtol=1e-4, atol=1e-6)
        assert model.training


def test_batch_stats_gradients_equal_train_mode_autograd_and_leave_statistics_untouched():
    """batch_stats=True: row i is the gradient with BatchNorm normalising row i's own mini-batch (a float64
    train-mode oracle, statistics through the graph); the running statistics and the mode are unchanged."""
    import copy

    model = _conv_net()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    before = copy.deepcopy(model[1].state_dict())
    x, y = torch.randn(12, 2, 5, 5), torch.randint(0, 4, (12,))
    ref = copy.deepcopy(model).double().train()
    expected = []
    for i in range(3):
        sl = slice(4 * i, 4 * i + 4)
        loss = nn.functional.cross_entropy(ref(x[sl].double()), y[sl])
        expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [ref[0].weight, ref[4].weight])]))
    model.eval()
    gs = per_sample_gradients(model, ["0.weight", "4.weight"], x, y, fisher_batch=4, batch_stats=True, strategy="vmap")
    np.testing.assert_allclose(gs.matrix().numpy(), torch.stack(expected).numpy(), rtol=1e-4, atol=1e-6)
    eval_rows = per_sample_gradients(model, ["0.weight", "4.weight"], x, y, fisher_batch=4).matrix()
    assert not torch.allclose(eval_rows, gs.matrix(), atol=1e-3)  # the running statistics give other rows
    assert not model.training and not model[1].training
    for key, value in before.items():
        assert torch.equal(model[1].state_dict()[key], value), key
    with pytest.raises(ValueError, match="'fisher_batch'.*>= 2.*Got 1"):
        per_sample_gradients(model, ["0.weight"], x, y, fisher_batch=1, batch_stats=True)
    # no BatchNorm: the flag changes nothing (and single-sample rows are fine)
    mlp = _net()
    xm, ym = torch.randn(6, 12), torch.randint(0, 3, (6,))
    assert torch.equal(per_sample_gradients(mlp, ["1.weight"], xm, ym, batch_stats=True).matrix(),
                       per_sample_gradients(mlp, ["1.weight"], xm, ym).matrix())


def test_loop_strategy_handles_frozen_parameters_and_restores_their_flag():
    model = _conv_net().eval()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,))
    loop = per_sample_gradients(model, ["0.weight"], x, y, fisher_batch=4, strategy="loop").matrix()
    vmapped = per_sample_gradients(model, ["0.weight"], x, y, fisher_batch=4, strategy="vmap").matrix()
    np.testing.assert_allclose(loop.numpy(), vmapped.numpy(), rtol=1e-4, atol=1e-6)
    assert not model[0].weight.requires_grad


def test_gradient_strategy_auto_loops_over_mini_batches_of_conv_nets_only():
    from engine.fisher import choose_strategy

    assert choose_strategy(_conv_net(), 16) == "loop"
    assert choose_strategy(_conv_net(), 4) == "loop"
    assert choose_strategy(_conv_net(), 1) == "vmap"
    assert choose_strategy(_net(), 32) == "vmap"


def test_per_sample_gradients_restores_training_mode_and_rejects_bad_input():
    model = _net().train()
    x, y = torch.randn(4, 12), torch.randint(0, 3, (4,))
    per_sample_gradients(model, ["1.weight"], x, y)
    assert model.training
    with pytest.raises(ValueError, match="'fisher_batch'.*>= 1"):
        per_sample_gradients(model, ["1.weight"], x, y, fisher_batch=0)
    with pytest.raises(ValueError, match="'parameter_names'"):
        per_sample_gradients(model, ["nope.weight"], x, y)
    with pytest.raises(ValueError, match="'inputs'"):
        per_sample_gradients(model, ["1.weight"], x, y, fisher_batch=5)
    with pytest.raises(ValueError, match="'strategy'.*one of auto, vmap, loop.*'fast'"):
        per_sample_gradients(model, ["1.weight"], x, y, strategy="fast")
