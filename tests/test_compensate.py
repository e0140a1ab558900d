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
    prune(plain, names, (x, y), _config())
    report = prune(moved, names, (x, y), _config(compensate="rest"))
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
    report = prune(model, names, (x, y), config)
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
    prune(model, names, (x, y), config)
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


def test_cli_params_set_compensate_and_couple_mean_and_describe_shows_them():
    from engine.cli import build_parser, prune_settings
    from engine.recommend import describe, recommended

    base = ["prune", "--model", "resnet20", "--sparsity", "0.8", "--out", "x"]
    rec = recommended("resnet20", 0.8)
    settings = prune_settings(build_parser().parse_args(base + ["--param", "compensate=rest", "--param",
                                                                "couple_mean=true"]))
    assert settings["compensate"] == "rest" and settings["couple_mean"] is True
    assert "--param couple_mean=true --param compensate=rest" in describe({**rec, **settings})
    settings = prune_settings(build_parser().parse_args(base + ["--param", "newton_step_only=true"]))
    assert settings["newton_step_only"] is True and "--param newton_step_only=true" in describe({**rec, **settings})
    settings = prune_settings(build_parser().parse_args(base + ["--param", "compensate=fc.bias,bn1.weight"]))
    assert settings["compensate"] == ("fc.bias", "bn1.weight") and "couple_mean" not in settings
    assert "--param compensate=fc.bias,bn1.weight" in describe({**rec, **settings})
    PruneConfig(sparsity=0.8, **{**rec, **settings})  # the recommendation has the first-order term: valid


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
        report = prune(model, names, (x, y), _config(**kw))
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
        prune(cached, names, (x, y), _config(couple_mean=flag), cache=cache)
        prune(fresh, names, (x, y), _config(couple_mean=flag))
        np.testing.assert_array_equal(_kept_values(cached, names), _kept_values(fresh, names))


# ----------------------------------------------------------------------------- block_steps
def _dense_block_steps(problems, supports, vs):
    """Oracle for formulations.objective.block_step_sizes: the joint model over the concatenated vector,
    Q(τ) = (r + Dτ)ᵀ g + ½ (r + Dτ)ᵀ H (r + Dτ), H = XᵀX + diag(λ_b), D the blocks' directions as columns."""
    X = np.hstack([p.factor for p in problems])
    lam = np.concatenate([np.full(p.n, p.damping) for p in problems])
    H = X.T @ X + np.diag(lam)
    g = np.concatenate([p.gradient if p.gradient is not None else np.zeros(p.n) for p in problems])
    r, D, start = np.zeros(H.shape[0]), np.zeros((H.shape[0], len(problems))), 0
    for b, (p, s, v) in enumerate(zip(problems, supports, vs)):
        m = np.where(s, p.weights, 0.0)
        r[start : start + p.n] = m - p.weights
        D[start : start + p.n, b] = v - m
        start += p.n
    moving = np.flatnonzero(np.abs(D).sum(0) > 0)
    tau = np.ones(len(problems))
    Dm = D[:, moving]
    tau[moving] = np.linalg.solve(Dm.T @ H @ Dm, -Dm.T @ (H @ r + g))
    return tau


@pytest.mark.parametrize("seed", range(3))
def test_block_step_sizes_minimise_the_joint_model_with_the_cross_block_terms(seed):
    from formulations import BlockProblem
    from formulations.objective import block_step_sizes, joint_quadratic_model, optimal_update

    rng = np.random.default_rng(seed)
    N = 25
    shared = rng.normal(size=(N, 1))  # a common direction in the rows: the blocks' steps are correlated
    problems = [BlockProblem(weights=rng.normal(size=n), n_keep=k, damping=0.05 * (b + 1),
                             factor=((rng.normal(size=(N, n)) + shared) / np.sqrt(N)).astype(dtype),
                             gradient=rng.normal(size=n) * 0.3 if b != 1 else None)
                for b, (n, k, dtype) in enumerate([(9, 4, np.float64), (6, 3, np.float32), (5, 5, np.float64),
                                                   (4, 0, np.float64)])]
    supports = [np.isin(np.arange(p.n), np.argsort(-np.abs(p.weights))[: p.n_keep]) for p in problems]
    vs = [optimal_update(p, s).weights for p, s in zip(problems, supports)]
    got = block_step_sizes(problems, supports, vs)
    want = _dense_block_steps([BlockProblem(p.weights, p.n_keep, p.damping, factor=p.factor.astype(np.float64),
                                            gradient=p.gradient) for p in problems], supports, vs)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got[3] == 1.0  # nothing kept, nothing moves: τ is irrelevant and left at 1
    assert not np.allclose(got[:3], 1.0)  # the cross terms matter here

    def q(tau):
        return joint_quadratic_model(problems, [np.where(s, p.weights, 0) + t * (v - np.where(s, p.weights, 0))
                                                for p, s, v, t in zip(problems, supports, vs, tau)])
    assert q(got) < q(np.ones(4))
    for _ in range(20):
        assert q(got) <= q(got + 1e-3 * rng.normal(size=4)) + 1e-12


def test_joint_model_is_the_sum_of_block_models_plus_the_cross_terms():
    from formulations import BlockProblem
    from formulations.objective import joint_quadratic_model, quadratic_model

    rng = np.random.default_rng(5)
    problems = [BlockProblem(weights=rng.normal(size=n), n_keep=1, damping=0.1, factor=rng.normal(size=(7, n)),
                             gradient=rng.normal(size=n)) for n in (3, 4)]
    vs = [rng.normal(size=p.n) for p in problems]
    cross = float((problems[0].factor @ (vs[0] - problems[0].weights)) @ (problems[1].factor @ (vs[1] - problems[1].weights)))
    assert joint_quadratic_model(problems, vs) == pytest.approx(
        quadratic_model(problems[0], vs[0]) + quadratic_model(problems[1], vs[1]) + cross, rel=1e-12)
    with pytest.raises(Exception, match="same samples"):
        joint_quadratic_model([problems[0], BlockProblem(np.ones(2), 1, 0.1, factor=np.ones((3, 2)))], vs)


def test_block_steps_scale_each_blocks_update_by_its_recorded_step(trained):
    """Against a run without it (same supports: magnitude selection): every block's kept weights are
    m_b + τ_b (u_b − m_b), τ_b the stage record's block_steps, the compensating blocks too; and the τ_b
    equal the oracle's on the run's own gradient rows."""
    base, x, y = trained
    names = _names(base)
    comp = ("1.bias", "4.bias")
    plain, scaled = copy.deepcopy(base), copy.deepcopy(base)
    prune(plain, names, (x, y), _config(compensate=comp))
    report = prune(scaled, names, (x, y), _config(compensate=comp, block_steps=True))
    taus = report.stages[0].block_steps
    assert len(taus) == 4 and not np.allclose(taus, 1.0)
    every = names + list(comp)
    params = dict(base.named_parameters())
    state = scaled.state_dict()
    keep = {n: (state[n + "_mask"].reshape(-1).numpy().astype(bool) if n + "_mask" in state
                else np.ones(params[n].numel(), dtype=bool)) for n in every}
    for n, tau in zip(every, taus):
        w = params[n].detach().reshape(-1).double().numpy()
        m = np.where(keep[n], w, 0.0)
        u = _kept_values(plain, [n])
        np.testing.assert_allclose(_kept_values(scaled, [n]), m + tau * (u - m), rtol=1e-5, atol=1e-6)

    # the oracle on the same rows: the blocks' problems rebuilt from autograd gradients in float64
    from formulations import BlockProblem
    config = _config(compensate=comp)
    G = _rows(copy.deepcopy(base), every, x, y, config)
    X = G / np.sqrt(G.shape[0])
    g = G.mean(0) / config.fisher_batch
    problems, supports, vs, start = [], [], [], 0
    for n in every:
        size = params[n].numel()
        w = params[n].detach().reshape(-1).double().numpy()
        problems.append(BlockProblem(w, int(keep[n].sum()), config.damping, factor=X[:, start : start + size],
                                     gradient=g[start : start + size]))
        supports.append(keep[n])
        vs.append(_kept_values(plain, [n]))
        start += size
    np.testing.assert_allclose(taus, _dense_block_steps(problems, supports, vs), rtol=2e-4)


@pytest.mark.parametrize("kw, argument", [
    (dict(couple_mean=True), "block_steps"),
    (dict(newton_step_only=True, step_search=True), "block_steps"),
    (dict(update=False), "update"),
    (dict(block_steps="yes"), "block_steps"),
])
def test_bad_block_steps_settings_are_rejected_on_construction(kw, argument):
    with pytest.raises(InvalidOptionError, match=argument):
        _config(**{"block_steps": True, **kw})


def test_cli_param_sets_block_steps_and_describe_shows_it():
    from engine.cli import build_parser, prune_settings
    from engine.recommend import describe, recommended

    base = ["prune", "--model", "resnet20", "--sparsity", "0.8", "--out", "x"]
    settings = prune_settings(build_parser().parse_args(base + ["--param", "block_steps=true"]))
    assert settings["block_steps"] is True
    assert "--param block_steps=true" in describe({**recommended("resnet20", 0.8), **settings})
    assert "block_steps" not in prune_settings(build_parser().parse_args(base))


def test_the_joint_model_functions_reject_mismatched_blocks_with_one_message_each():
    from formulations import BlockProblem
    from formulations.errors import InvalidProblemError
    from formulations.objective import block_step_sizes, joint_quadratic_model

    rng = np.random.default_rng(1)
    a = BlockProblem(weights=rng.normal(size=3), n_keep=1, damping=0.1, factor=rng.normal(size=(5, 3)))
    b = BlockProblem(weights=rng.normal(size=2), n_keep=1, damping=0.1, factor=rng.normal(size=(5, 2)))
    dense = BlockProblem(weights=rng.normal(size=2), n_keep=1, damping=0.1, fisher=np.eye(2))
    keep = [np.array([True, False, False]), np.array([True, False])]
    vs = [np.zeros(3), np.zeros(2)]
    for fn, args in ((joint_quadratic_model, ([], [])), (block_step_sizes, ([], [], []))):
        with pytest.raises(InvalidProblemError, match="at least one block. Got none"):
            fn(*args)
    with pytest.raises(InvalidProblemError, match=r"same samples.*Got row counts \['5', 'None'\]"):
        block_step_sizes([a, dense], keep, vs)
    with pytest.raises(InvalidProblemError, match="'vs' argument.*one vector per block \\(2\\). Got 1"):
        joint_quadratic_model([a, b], vs[:1])
    with pytest.raises(InvalidProblemError, match="one entry per block \\(2\\). Got 1 and 2"):
        block_step_sizes([a, b], keep[:1], vs)
