"""PruneConfig.compensate: parameters that are never pruned but take the quadratic model's Newton step
with the kept weights (checked against a numpy float64 reference built from autograd gradients)."""

import copy

import numpy as np
import pytest
import torch

from engine.data import load_digits
from engine.errors import InvalidOptionError
from engine.pruner import PruneConfig, check_prune_inputs, compensating_parameters, prune


@pytest.fixture(scope="module")
def trained():
    """A small digits classifier with biases and a BatchNorm layer (parameters that are not pruned)."""
    x, y = load_digits("train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 24), torch.nn.BatchNorm1d(24),
                                torch.nn.ReLU(), torch.nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def _names(model):
    return ["1.weight", "4.weight"]


def _config(**kw):
    base = dict(sparsity=0.6, method="magnitude", update=True, fisher_samples=40, fisher_batch=3,
                block_mode="layer", first_order=True, damping=1e-2, seed=4)
    return PruneConfig(**{**base, **kw})


def _reference_step(model, name, x, y, config):
    """w − (F + λI)⁻¹ g in float64: F = XᵀX from the rows' mean gradients G (X = G/√N), g = mean(G)/B."""
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    idx = idx[: config.fisher_samples * config.fisher_batch]
    param = dict(model.named_parameters())[name]
    rows = []
    for r in range(config.fisher_samples):
        part = idx[r * config.fisher_batch : (r + 1) * config.fisher_batch]
        loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
        (grad,) = torch.autograd.grad(loss, [param])
        rows.append(grad.reshape(-1).double().numpy())
    G = np.stack(rows)
    X = G / np.sqrt(G.shape[0])
    H = X.T @ X + config.damping * np.eye(G.shape[1])
    g = G.mean(0) / config.fisher_batch
    w = param.detach().reshape(-1).double().numpy()
    return w - np.linalg.solve(H, g)


def test_shorthands_name_the_unpruned_and_the_normalisation_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    assert compensating_parameters(model, ["0.weight", "2.weight"], "rest") == ("0.bias", "1.weight", "1.bias",
                                                                                "2.bias")
    assert compensating_parameters(model, ["0.weight", "2.weight"], "norm") == ("1.weight", "1.bias")
    assert compensating_parameters(model, ["0.weight"], ("2.bias",)) == ("2.bias",)
    with pytest.raises(InvalidOptionError, match=r"'spec'.*compensating_parameters\(\).*rest, norm.*'all'"):
        compensating_parameters(model, ["0.weight"], "all")


def test_compensating_parameters_take_the_damped_newton_step_and_leave_the_selection_alone(trained):
    base, x, y = trained
    names = _names(base)
    comp = compensating_parameters(base, names, "rest")
    assert comp and not set(comp) & set(names)
    plain, moved = copy.deepcopy(base), copy.deepcopy(base)
    prune(plain, names, x, y, _config())
    report = prune(moved, names, x, y, _config(compensate="rest"))
    assert tuple(report.config["compensate"]) == comp
    p_plain, p_moved = dict(plain.named_parameters()), dict(moved.named_parameters())
    state_plain, state_moved = plain.state_dict(), moved.state_dict()
    for n in names:  # the pruned blocks are independent of the compensating ones: same masks, same weights
        key = n + "_orig" if n + "_orig" in state_plain else n
        assert torch.equal(state_plain[key], state_moved[key])
    for n in comp:
        assert torch.equal(p_plain[n], dict(base.named_parameters())[n])  # untouched without compensate
        ref = _reference_step(copy.deepcopy(base), n, x, y, _config())
        got = p_moved[n].detach().reshape(-1).double().numpy()
        assert not np.allclose(got, p_plain[n].detach().reshape(-1).double().numpy())
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6)


def test_compensating_parameters_move_with_the_step_search_and_over_stages(trained):
    """With the step search the compensating parameters end at w + τ(v − w) of the same τ as the pruned
    weights; over several stages the run still reaches the target and the model's other parameters
    are untouched."""
    base, x, y = trained
    names = _names(base)
    model = copy.deepcopy(base)
    config = _config(compensate=("1.bias", "2.weight"), step_search=True, loss_samples=200, stages=3, schedule="poly", sparsity=0.8)
    comp = compensating_parameters(base, names, config.compensate)
    report = prune(model, names, x, y, config)
    assert report.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
    before = dict(base.named_parameters())
    after = dict(model.named_parameters())
    for n, p in before.items():
        if n in comp:
            assert not torch.equal(after[n], p)
        elif n not in names:
            assert torch.equal(after[n], p)


@pytest.mark.parametrize("kw, argument", [
    (dict(compensate="everything"), "compensate"),
    (dict(compensate=3), "compensate"),
    (dict(compensate="rest", first_order=False), "first_order"),
])
def test_bad_compensate_settings_are_rejected_on_construction(kw, argument):
    with pytest.raises(InvalidOptionError, match=argument):
        _config(**kw)


@pytest.mark.parametrize("comp", [("nope",), ("1.weight",), ("1.bias", "1.bias")])
def test_compensate_names_are_checked_against_the_model_before_any_work(trained, comp):
    base, x, y = trained
    names = _names(base)
    with pytest.raises(InvalidOptionError, match="compensate"):
        check_prune_inputs(base, names, int(x.shape[0]), _config(compensate=comp))


def _rows(model, names, x, y, config):
    """(N, n) float64 mini-batch gradient rows of ``names`` for the run's seeded draw."""
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    idx = idx[: config.fisher_samples * config.fisher_batch]
    params = dict(model.named_parameters())
    rows = []
    for r in range(config.fisher_samples):
        part = idx[r * config.fisher_batch : (r + 1) * config.fisher_batch]
        loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(rows)


@pytest.mark.parametrize("mode, comp", [("layer", ()), ("layer", ("1.bias", "2.weight", "2.bias")),
                                        ("whole", ("1.bias", "4.bias"))])
def test_couple_mean_is_the_joint_newton_step_of_blockdiag_covariance_plus_the_mean_outer_product(trained, mode, comp):
    """Oracle: H = blockdiag(Cov_b + λI) + m mᵀ over all blocks (Cov_b the rows' covariance, m their mean),
    g = m/B; the kept weights of the run's masks move by d_S = −H_SS⁻¹(g_S + H_SP d_P), d_P = −w_P, solved
    densely in float64 over the whole network."""
    base, x, y = trained
    names = _names(base)
    config = _config(couple_mean=True, compensate=comp, block_mode=mode)
    model = copy.deepcopy(base)
    prune(model, names, x, y, config)
    every = names + list(comp)
    G = _rows(copy.deepcopy(base), every, x, y, config)
    m = G.mean(0)
    Xc = (G - m) / np.sqrt(G.shape[0])
    params = dict(base.named_parameters())
    sizes = [params[n].numel() for n in every]
    if mode == "whole":  # the pruned parameters form one block, each compensating one its own
        sizes = [sum(sizes[: len(names)])] + sizes[len(names):]
    H = np.outer(m, m)
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        H[block, block] += Xc[:, block].T @ Xc[:, block] + config.damping * np.eye(size)
        start += size
    w = np.concatenate([params[n].detach().reshape(-1).double().numpy() for n in every])
    state = model.state_dict()
    keep = np.concatenate([state[n + "_mask"].reshape(-1).numpy().astype(bool) if n + "_mask" in state
                           else np.ones(params[n].numel(), dtype=bool) for n in every])
    got = np.concatenate([(state[n + "_orig"] if n + "_orig" in state else state[n]).reshape(-1).double().numpy()
                          for n in every])
    d = np.zeros_like(w)
    d[~keep] = -w[~keep]
    S = np.flatnonzero(keep)
    rhs = m[S] / config.fisher_batch + H[np.ix_(S, np.flatnonzero(~keep))] @ d[~keep]
    d[S] = -np.linalg.solve(H[np.ix_(S, S)], rhs)
    np.testing.assert_allclose(got[S], (w + d)[S], rtol=2e-4, atol=2e-6)


def test_cli_flags_set_compensate_and_couple_mean_and_describe_shows_them():
    from engine.cli import build_parser, prune_settings
    from engine.defaults import describe

    base = ["prune", "--model", "resnet20", "--sparsity", "0.8", "--out", "x"]
    settings, _ = prune_settings(build_parser().parse_args(base + ["--compensate", "rest", "--couple-mean"]))
    assert settings["compensate"] == "rest" and settings["couple_mean"] is True
    assert "--couple-mean --compensate rest" in describe(settings)
    settings, _ = prune_settings(build_parser().parse_args(base + ["--newton-step-only"]))
    assert settings["newton_step_only"] is True and "--newton-step-only" in describe(settings)
    settings, _ = prune_settings(build_parser().parse_args(base + ["--compensate", "fc.bias,bn1.weight"]))
    assert settings["compensate"] == ("fc.bias", "bn1.weight") and "couple_mean" not in settings
    assert "--compensate fc.bias,bn1.weight" in describe(settings)
    PruneConfig(sparsity=0.8, **settings)  # the recommendation has the first-order term, so this is a valid config


def _kept_values(model, names):
    state = model.state_dict()
    return np.concatenate([(state[n + "_orig"] if n + "_orig" in state else state[n]).reshape(-1).double().numpy()
                           for n in names])


def test_newton_step_only_scales_the_gradient_part_and_keeps_the_removals_compensation(trained):
    """The step search's segment starts at the CBS-U update without the gradient term (v₀) and ends at the
    first-order update (v_g): the result is v₀ + τ (v_g − v₀) for the recorded τ, never the masked weights."""
    base, x, y = trained
    names = _names(base)
    runs = {}
    for key, kw in {"v0": dict(first_order=False), "vg": dict(),
                    "tau": dict(step_search=True, loss_samples=300, newton_step_only=True)}.items():
        model = copy.deepcopy(base)
        report = prune(model, names, x, y, _config(**kw))
        runs[key] = (_kept_values(model, names), report.stages[-1].step)
    (v0, _), (vg, _), (got, tau) = runs["v0"], runs["vg"], runs["tau"]
    assert not np.allclose(v0, vg)
    np.testing.assert_allclose(got, v0 + tau * (vg - v0), rtol=1e-5, atol=1e-6)
    for bad in (dict(couple_mean=True, step_search=True), dict(step_search=False), dict(first_order=False)):
        with pytest.raises(InvalidOptionError, match="newton_step_only"):
            _config(newton_step_only=True, **{"step_search": True, **bad})


def test_a_sweep_cache_never_hands_centred_blocks_to_a_run_without_couple_mean(trained):
    """The cache key holds couple_mean (its blocks' factors are centred): the same run with and without
    a shared cache gives the same weights, in either order."""
    base, x, y = trained
    names = _names(base)
    cache: dict = {}
    for flag in (True, False):
        cached, fresh = copy.deepcopy(base), copy.deepcopy(base)
        prune(cached, names, x, y, _config(couple_mean=flag), cache=cache)
        prune(fresh, names, x, y, _config(couple_mean=flag))
        np.testing.assert_array_equal(_kept_values(cached, names), _kept_values(fresh, names))
