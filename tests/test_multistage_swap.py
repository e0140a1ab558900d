"""Issue 4: the update-aware swap search (against brute force and a fresh factorisation), the sparsity
schedules, multi-stage pruning, the first-order term, the step search, parallel blocks and the files
`cbs prune` writes."""

import copy
import json
import operator

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import load_digits
from engine.demo import train_small_mlp
from engine.errors import InvalidOptionError
from engine.fisher import per_sample_gradients
from engine.models import prunable_parameters
from engine.losses import STEPS, mean_loss, search_steps
from engine.pruner import PruneConfig, prune
from engine.result import SolveResult
from engine.solve import solve_block
from engine.solvers.base import Capabilities, SubsetSolver
from engine.solvers.swap import SwapSolver, _State
from formulations.allocation import sparsity_schedule
from formulations.errors import InvalidProblemError
from formulations.objective import optimal_update
from random_problems import make_problem


# ----------------------------------------------------------------------------- swap solver
@pytest.mark.parametrize("kind", ["well", "ill"])
@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_swap_is_never_below_brute_force_and_never_worse_than_its_start(kind, with_gradient, seed):
    p = make_problem(11, 5, seed, kind, with_gradient)
    best = solve_block(p, "brute_force").objective
    start = solve_block(p, "magnitude").objective
    r = solve_block(p, "swap")
    assert r.objective >= best - 1e-9 * max(1.0, abs(best))
    assert r.objective <= start + 1e-12 * max(1.0, abs(start))
    assert r.extra["start_objective"] == pytest.approx(start, rel=1e-9, abs=1e-12)


def test_swap_finds_the_optimum_on_well_conditioned_blocks():
    hits = 0
    for seed in range(10):
        p = make_problem(12, 6, seed, "well")
        hits += solve_block(p, "swap").objective <= solve_block(p, "brute_force").objective * (1 + 1e-9)
    assert hits >= 9


@pytest.mark.parametrize("with_gradient", [False, True])
def test_swap_state_matches_a_fresh_factorisation_after_many_swaps(with_gradient):
    """Every accepted swap lowers E by exactly the predicted ΔE, and the low-rank-updated A, v, r equal
    those of a fresh Cholesky on the final support."""
    p = make_problem(40, 12, 3, "ill", with_gradient)
    g = p.gradient if p.gradient is not None else np.zeros(p.n)
    rng = np.random.default_rng(0)
    state = _State(p.factor, p.weights, p.damping, g, p.target(), np.sort(rng.choice(p.n, 12, replace=False)))
    before = state.objective()
    made = 0
    for _ in range(3):
        state.prepare(np.setdiff1d(rng.permutation(p.n), state.idx)[:10])
        for i in range(10):
            value = state.objective()
            if state.try_candidate(i, 0.0):
                made += 1
                assert state.objective() < value
    assert made >= 3 and state.objective() < before
    support = np.zeros(p.n, dtype=bool)
    support[state.idx] = True
    ref = optimal_update(p, support)
    assert state.objective() == pytest.approx(ref.objective, rel=1e-8)
    np.testing.assert_allclose(state.v, ref.weights[state.idx], rtol=1e-7, atol=1e-9)
    H = p.dense_hessian()[np.ix_(state.idx, state.idx)]
    np.testing.assert_allclose(state.A, np.linalg.inv(H), rtol=1e-6, atol=1e-8 * np.abs(state.A).max())


def test_swap_rejects_bad_parameters():
    with pytest.raises(InvalidOptionError, match="'candidates'"):
        SwapSolver(candidates=0)
    with pytest.raises(InvalidOptionError, match="'start'"):
        SwapSolver(start="swap")
    with pytest.raises(InvalidOptionError, match="'tol'"):
        SwapSolver(tol=-1.0)


def test_swap_returns_its_start_above_max_keep():
    p = make_problem(12, 6, 0, "well")
    with pytest.warns(UserWarning, match="max_keep"):
        r = solve_block(p, SwapSolver(max_keep=5))
    assert r.extra["skipped"] == "k above max_keep"
    assert np.array_equal(r.support, solve_block(p, "magnitude").support)


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["linear", "exp", "poly"])
def test_schedule_is_increasing_and_ends_at_the_target(kind):
    s = sparsity_schedule(0.9, 7, kind)
    assert len(s) == 7 and s[-1] == 0.9
    assert all(a < b for a, b in zip(s, s[1:])) and s[0] > 0
    assert sparsity_schedule(0.9, 1, kind) == [0.9]


def test_schedule_shapes():
    lin, ex, poly = (sparsity_schedule(0.8, 4, k) for k in ("linear", "exp", "poly"))
    np.testing.assert_allclose(lin, [0.2, 0.4, 0.6, 0.8])
    kept = 1 - np.array(ex)
    np.testing.assert_allclose(kept[1:] / kept[:-1], kept[0])  # the same factor every stage
    np.testing.assert_allclose(poly, [0.8 - 0.8 * (1 - t / 4) ** 3 for t in range(1, 5)])


@pytest.mark.parametrize("args, match", [((0.9, 0, "exp"), "'stages'"), ((0.9, 3, "cubic"), "'kind'"),
                                         ((1.0, 3, "exp"), "'target'")])
def test_schedule_rejects_bad_input(args, match):
    with pytest.raises(InvalidProblemError, match=match):
        sparsity_schedule(*args)


# ----------------------------------------------------------------------------- multi-stage pruner
@pytest.fixture(scope="module")
def trained():
    model, _ = train_small_mlp(epochs=60, seed=0)
    x, y = load_digits("train")
    return model, x, y


def _names(model):
    return [n for n, _ in prunable_parameters(model)]


def test_multistage_keeps_pruned_weights_pruned_and_reaches_the_target(trained):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = _names(model)
    seen = []

    def on_stage(stage, staged):
        flat = torch.cat([dict(staged.named_parameters())[n].detach().reshape(-1) for n in names])
        seen.append((stage.sparsity, flat != 0))

    config = PruneConfig(sparsity=0.8, method="magnitude", update=True, fisher_samples=200, block_mode="layer",
                         stages=3, schedule="linear")
    report = prune(model, names, (x, y), config, on_stage=on_stage)
    assert [s.sparsity for s in report.stages] == pytest.approx([0.8 / 3, 1.6 / 3, 0.8])
    assert [s.n_keep for s in report.stages] == sorted((s.n_keep for s in report.stages), reverse=True)
    assert report.n_keep == round(0.2 * report.n_total)
    assert len(seen) == 2  # called after every stage but the last
    final = torch.cat([report.masks[n].reshape(-1) for n in names])
    for _, alive in seen:  # nested supports: what a stage pruned stays pruned
        assert not torch.any(final & ~alive)
    assert not torch.any(seen[1][1] & ~seen[0][1])


def test_multistage_row_blocks_survive_a_block_pruned_to_nothing(trained):
    """A row block whose weights an earlier stage pruned entirely has nothing left to select or update:
    later stages skip it (they used to fail on the empty block), it stays zero, and the target is met."""
    base, x, y = trained
    model = copy.deepcopy(base)
    names = _names(model)
    first = dict(model.named_parameters())[names[0]]
    with torch.no_grad():
        first[0].mul_(1e-6)  # magnitude prunes this whole row in stage 1
    seen = []
    config = PruneConfig(sparsity=0.8, method="magnitude", update=True, fisher_samples=100, block_mode="row",
                         stages=3, schedule="linear", first_order=True)
    report = prune(model, names, (x, y), config,
                   on_stage=lambda stage, staged: seen.append(int((dict(staged.named_parameters())[names[0]][0] != 0).sum())))
    assert seen[0] == 0  # the row is dead after stage 1, so stages 2 and 3 ran with an empty block
    assert not torch.any(report.masks[names[0]][0])
    assert torch.all(operator.attrgetter(names[0])(model)[0] == 0)  # the weight as the model now uses it
    assert report.n_keep == round(0.2 * report.n_total)
    assert all(b.n > 0 for b in report.blocks)


def test_multistage_failure_restores_the_model(trained):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = _names(model)
    before = copy.deepcopy(model.state_dict())

    class FailsSecond(SubsetSolver):
        name = "fails_second"
        capabilities = Capabilities()

        def __init__(self):
            self.calls = 0

        def solve(self, problem, options, warm_start=None):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom in stage 2")
            return SolveResult(support=np.argsort(-np.abs(problem.weights))[: problem.n_keep])

    with pytest.raises(RuntimeError, match="boom"):
        prune(model, names, (x, y), PruneConfig(sparsity=0.7, method=FailsSecond(), update=True, fisher_samples=100,
                                              block_mode="whole", stages=2))
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k])


def test_first_order_term_is_the_mean_gradient(trained):
    """With first_order the block's g equals autograd's gradient of the mean loss (B = 1), or 1/B of it
    with mini-batch rows: checked through a solver that records the problems it is given."""
    base, x, y = trained
    names = _names(base)
    got = []

    class Record(SubsetSolver):
        name = "record"
        capabilities = Capabilities()

        def solve(self, problem, options, warm_start=None):
            got.append(problem.gradient.copy())
            return SolveResult(support=np.argsort(-np.abs(problem.weights))[: problem.n_keep])

    for batch in (1, 4):
        got.clear()
        model = copy.deepcopy(base)
        config = PruneConfig(sparsity=0.5, method=Record(), update=True, fisher_samples=50, fisher_batch=batch,
                             block_mode="whole", first_order=True, seed=3)
        prune(model, names, (x, y), config)
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))[: 50 * batch]
        ref_model = copy.deepcopy(base)
        loss = torch.nn.functional.cross_entropy(ref_model(x[idx]), y[idx])
        params = dict(ref_model.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        ref = torch.cat([g.reshape(-1) for g in grads]).double().numpy() / batch
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("holdout", [False, True])
def test_loss_samples_are_in_the_fisher_draw_or_disjoint_from_it_with_holdout(trained, holdout):
    """The loss samples a solver's evaluate callback sees: a prefix of the Fisher samples by default, and
    with holdout_loss the next samples of the same seeded permutation (none of them a Fisher sample)."""
    base, x, y = trained
    seen = []

    class Record(SubsetSolver):
        name = "record_loss_samples"
        capabilities = Capabilities()

        def solve(self, problem, options, warm_start=None):
            seen.append(options.evaluate.prefix.inputs.clone())
            return SolveResult(support=np.argsort(-np.abs(problem.weights))[: problem.n_keep])

    config = PruneConfig(sparsity=0.5, method=Record(), update=True, fisher_samples=30, fisher_batch=2,
                         block_mode="whole", loss_samples=40, holdout_loss=holdout, seed=5)
    prune(copy.deepcopy(base), _names(base), (x, y), config)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(5))
    fisher_rows = {tuple(r.tolist()) for r in x[perm[:60]]}
    loss_rows = [tuple(r.tolist()) for r in seen[0]]
    assert len(loss_rows) == 40
    if holdout:
        assert torch.equal(seen[0], x[perm[60:100]])
        assert not fisher_rows.intersection(loss_rows)
    else:
        assert torch.equal(seen[0], x[perm[:40]])
        assert set(loss_rows) <= fisher_rows


def test_holdout_loss_needs_loss_samples_that_fit_beside_the_fisher_samples(trained):
    base, x, y = trained
    with pytest.raises(InvalidOptionError, match="'loss_samples'.*>= 1 when holdout_loss is on.*Got None"):
        PruneConfig(sparsity=0.5, holdout_loss=True)
    config = PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=x.shape[0] - 10, loss_samples=11,
                         holdout_loss=True)
    with pytest.raises(InvalidOptionError, match=f"at most the 10 training samples left after the {x.shape[0] - 10}"):
        prune(copy.deepcopy(base), _names(base), (x, y), config)


@pytest.mark.parametrize("seed", range(40))
def test_step_search_equals_the_grid_minimum_when_the_loss_has_one_minimum(seed):
    """Oracle: the minimum over all of STEPS. A convex loss along the segment (a random parabola or
    |·| curve in τ) has a single minimum on the grid; the early stop must find it."""
    rng = np.random.default_rng(seed)
    centre, scale = rng.uniform(-0.2, 1.3), rng.uniform(0.1, 5.0)
    curve = (lambda t: scale * (t - centre) ** 2) if seed % 2 else (lambda t: scale * abs(t - centre))
    calls = []

    def loss(t):
        calls.append(t)
        return curve(t) + 1.0

    tau, value, count = search_steps(loss)
    best = min(STEPS, key=lambda t: (curve(t), STEPS.index(t)))
    assert tau == best and value == pytest.approx(curve(best) + 1.0)
    assert count == len(calls) and calls[0] == 1.0 and calls[-1] == 0.0
    assert count <= len(STEPS)


def test_step_search_tries_the_masked_weights_and_stops_early():
    losses = {1.0: 2.0, 0.5: 1.5, 0.25: 1.7, 0.125: 0.1, 0.0625: 0.1, 0.03125: 0.1, 0.0: 3.0}
    calls = []
    tau, value, count = search_steps(lambda t: calls.append(t) or losses[t])
    # stops after 0.25 (no lower than 0.5), so the dip at 0.125 is not seen; τ = 0 is still tried
    assert (tau, value, count) == (0.5, 1.5, 4) and calls == [1.0, 0.5, 0.25, 0.0]
    losses[0.0] = 1.0  # the masked weights beat the first minimum: they are chosen
    assert search_steps(lambda t: losses[t])[:2] == (0.0, 1.0)
    assert search_steps(lambda t: {1.0: 0.5}.get(t, 1.0))[:2] == (1.0, 0.5)  # the full update, 3 losses


def test_step_search_never_raises_the_training_loss(trained):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = _names(model)
    config = PruneConfig(sparsity=0.6, method="magnitude", update=True, fisher_samples=200, block_mode="whole",
                         first_order=True, step_search=True, damping=1e-4, seed=2)
    report = prune(model, names, (x, y), config)
    (stage,) = report.stages
    assert stage.step in STEPS
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))[:200]
    # the chosen step's loss is the lowest of the grid: at most that of the masked weights (τ = 0)
    masked = copy.deepcopy(base)
    with torch.no_grad():
        for n in names:
            p = dict(masked.named_parameters())[n]
            p.mul_(report.masks[n].to(p.dtype))
    assert stage.train_loss <= mean_loss(masked, x[idx], y[idx]) + 1e-9
    assert mean_loss(model, x[idx], y[idx]) == pytest.approx(stage.train_loss, rel=1e-5)


def test_batch_stats_loss_uses_batch_statistics_and_leaves_running_ones_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    net.eval()
    bn = net[1]
    with torch.no_grad():  # running statistics far from the batch's: the two losses must differ
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.1)
    x, y = torch.randn(50, 3, 8, 8), torch.randint(0, 5, (50,))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    got = mean_loss(net, x, y, batch=20, batch_stats=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training and not bn.training
    # oracle: a copy in training mode, batch by batch (BatchNorm normalises each batch by its own statistics)
    ref_net = copy.deepcopy(net).train()
    with torch.no_grad():
        ref = sum(float(torch.nn.functional.cross_entropy(ref_net(x[s:s + 20]), y[s:s + 20], reduction="sum"))
                  for s in range(0, 50, 20)) / 50
    assert got == pytest.approx(ref, rel=1e-6)
    assert abs(got - mean_loss(net, x, y, batch=20)) > 1e-3


def test_step_search_bn_is_inert_without_batchnorm(trained):
    base, x, y = trained
    names = _names(base)
    out = []
    for flag in (False, True):
        model = copy.deepcopy(base)
        config = PruneConfig(sparsity=0.6, method="magnitude", update=True, fisher_samples=200, block_mode="whole",
                             first_order=True, step_search=True, step_search_bn=flag, damping=1e-4, seed=2)
        out.append(prune(model, names, (x, y), config).stages[0])
    assert out[0].step == out[1].step and out[0].train_loss == out[1].train_loss


def test_workers_give_the_same_masks(trained):
    base, x, y = trained
    names = _names(base)
    out = []
    for workers in (1, 2):
        model = copy.deepcopy(base)
        config = PruneConfig(sparsity=0.7, method="swap", fisher_samples=200, block_mode="layer", workers=workers)
        out.append(prune(model, names, (x, y), config))
    for n in names:
        assert torch.equal(out[0].masks[n], out[1].masks[n])
    assert [b.objective for b in out[0].blocks] == pytest.approx([b.objective for b in out[1].blocks], rel=1e-9)


@pytest.mark.parametrize("field, value, match", [("stages", 0, "'stages'"), ("workers", 0, "'workers'"),
                                                 ("schedule", "cubic", "'schedule'"), ("first_order", 1, "'first_order'"),
                                                 ("step_search_bn", "yes", "'step_search_bn'"),
                                                 ("fisher_bn_batch_stats", 1, "'fisher_bn_batch_stats'")])
def test_config_rejects_bad_multistage_settings(field, value, match):
    with pytest.raises(InvalidOptionError, match=match):
        PruneConfig(sparsity=0.5, **{field: value})


def test_config_rejects_batch_statistics_of_single_sample_rows():
    with pytest.raises(InvalidOptionError, match="'fisher_batch'.*>= 2 when fisher_bn_batch_stats is on.*Got 1"):
        PruneConfig(sparsity=0.5, fisher_bn_batch_stats=True)
    assert PruneConfig(sparsity=0.5, fisher_bn_batch_stats=True, fisher_batch=2).fisher_bn_batch_stats


@pytest.mark.parametrize("argv, match", [(["--stages", "0"], "--stages"), (["--schedule", "cubic"], "--schedule"),
                                         (["--workers", "-1"], "--workers")])
def test_cli_rejects_bad_multistage_flags(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--out", str(tmp_path)] + argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_rejects_batch_statistics_of_single_sample_rows(tmp_path, capsys):
    code = main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--out", str(tmp_path), "--method", "magnitude",
                 "--param", "fisher_bn_batch_stats=true"])
    assert code == 2
    assert ("'fisher_batch' argument of prune() must be an integer >= 2 when fisher_bn_batch_stats is on. Got 1."
            in capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_stage_test_false_skips_the_per_stage_test_pass_and_changes_nothing_else(shared_data, tmp_path):
    """--param stage_test=false: no per-stage accuracy in the record, the same masks, weights and accuracy."""
    common = ["prune", "--model", "mlpnet", "--data-dir", str(shared_data), "--sparsity", "0.9", "--fisher-samples",
              "32", "--fisher-batch", "4", "--stages", "3", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "with")]) == 0
    assert main([*common, "--param", "stage_test=false", "--out", str(tmp_path / "without")]) == 0
    with_, without = (json.loads((tmp_path / f / "record.json").read_text()) for f in ("with", "without"))
    assert all("accuracy" in s for s in with_["stages"][:2]) and not any("accuracy" in s for s in without["stages"])
    assert (with_["accuracy"], with_["objective_total"]) == (without["accuracy"], without["objective_total"])
    for name in ("mask.pt", "model.pt"):
        a, b = (torch.load(tmp_path / f / name) for f in ("with", "without"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_model_rejects_a_stage_test_that_is_not_a_bool():
    from engine.api import prune_model

    net = torch.nn.Sequential(torch.nn.Linear(6, 3))
    with pytest.raises(InvalidOptionError, match="'stage_test' argument of prepare\\(\\) must be.*Got 'yes'"):
        prune_model(net, (torch.randn(40, 6), torch.randint(0, 3, (40,))), sparsity=0.5, stage_test="yes")


def test_cli_multistage_writes_mask_and_model(shared_data, tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--model", "mlpnet", "--data-dir", str(shared_data), "--sparsity", "0.9", "--method",
                 "magnitude", "--update", "--fisher-samples", "64", "--fisher-batch", "4", "--block-mode", "whole",
                 "--stages", "3", "--schedule", "poly", "--first-order", "--step-search", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    record = json.loads((out / "record.json").read_text())
    assert [s["stage"] for s in record["stages"]] == [1, 2, 3]
    assert all("accuracy" in s for s in record["stages"][:2])
    mask = torch.load(out / "mask.pt")
    from engine.models import build_model

    plain = build_model("mlpnet")
    plain.load_state_dict(torch.load(out / "model.pt"), strict=True)
    params = dict(plain.named_parameters())
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == record["n_keep"] == round(0.1 * 32360)
    for n, m in mask.items():
        assert m.shape == params[n].shape and m.dtype == torch.bool
        assert torch.all(params[n][~m] == 0)


# ----------------------------------------------------------------------------- loss-curve budget
def test_knapsack_at_most_matches_enumeration():
    import itertools

    from engine.solvers.highs import solve_budget_allocation

    rng = np.random.default_rng(0)
    curves = []
    for _ in range(4):
        ks = np.sort(rng.choice(np.arange(0, 30), 5, replace=False))
        es = np.sort(rng.random(5))[::-1] * rng.uniform(0.5, 3)  # decreasing in k
        curves.append((ks, es))
    for total in (20, 37, 61):
        got = solve_budget_allocation(curves, total, at_most=True)
        best = min(
            (sum(c[1][j] for c, j in zip(curves, choice)), choice)
            for choice in itertools.product(range(5), repeat=4)
            if sum(c[0][j] for c, j in zip(curves, choice)) <= total
        )
        value = sum(c[1][list(c[0]).index(k)] for c, k in zip(curves, got))
        assert value == pytest.approx(best[0], rel=1e-9)
        assert sum(got) <= total


def test_loss_curve_allocation_sums_to_the_budget_and_beats_the_magnitude_split(trained):
    from engine.budget import loss_curve_allocation

    base, x, y = trained
    names = _names(base)
    grads = per_sample_gradients(base, names, x[:300], y[:300])
    params = dict(base.named_parameters())
    problems = []
    from formulations.problem import BlockProblem

    for n in names:
        X = (grads.rows[n] / np.sqrt(300)).numpy()
        problems.append(BlockProblem(params[n].detach().reshape(-1).double().numpy(), 0, 1e-3, factor=X, label=n))
    total = sum(p.n for p in problems)
    K = round(0.25 * total)
    alloc = loss_curve_allocation(problems, K)
    assert sum(alloc.n_keep) == K
    assert all(0 <= k <= p.n for k, p in zip(alloc.n_keep, problems))
    assert alloc.objective <= alloc.extra["magnitude_share_objective"] + 1e-12
    with pytest.raises(InvalidOptionError, match="'n_keep'"):
        loss_curve_allocation(problems, total + 1)


def test_prune_with_loss_curve_allocation(trained):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = _names(model)
    report = prune(model, names, (x, y), PruneConfig(sparsity=0.75, method="woodfisher", fisher_samples=200,
                                                   block_mode="layer", allocation="loss_curve"))
    assert report.n_keep == round(0.25 * report.n_total)
    assert report.stages[0].extra["allocation"] == "loss_curve"


def test_cache_reuses_stage_zero_problems_and_gives_the_same_result(trained):
    base, x, y = trained
    names = _names(base)
    cache = {}
    reports = []
    for _ in range(2):
        model = copy.deepcopy(base)
        reports.append(prune(model, names, (x, y), PruneConfig(sparsity=0.6, method="woodfisher", fisher_samples=150,
                                                             block_mode="layer", allocation="obs"), cache=cache))
    problem_keys = [k for k in cache if k[0] != "update"]
    assert len(problem_keys) == 1 and len(cache) == 2  # the problems, and the update of the one mask
    blocks, positions, problems, _ = cache[problem_keys[0]]
    assert all(any(k[0] == "hessian_inverse_diagonal" for k in p._derived if isinstance(k, tuple)) for p in problems)
    fresh = prune(copy.deepcopy(base), names, (x, y), PruneConfig(sparsity=0.6, method="woodfisher", fisher_samples=150,
                                                                block_mode="layer", allocation="obs"))
    for n in names:
        assert torch.equal(reports[1].masks[n], fresh.masks[n])
    # other weights: a different fingerprint, so no reuse
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    prune(other, names, (x, y), PruneConfig(sparsity=0.6, method="woodfisher", fisher_samples=150, block_mode="layer",
                                          allocation="obs"), cache=cache)
    assert len([k for k in cache if k[0] != "update"]) == 2


def test_cache_reuses_the_update_of_the_same_supports(trained):
    """magnitude (scored by the update) then magnitude+update on one cache: the second run takes the first
    one's update; oracle: the same run without a cache."""
    base, x, y = trained
    names = _names(base)
    cache = {}
    settings = dict(sparsity=0.7, method="magnitude", fisher_samples=150, block_mode="layer", certify=True)
    prune(copy.deepcopy(base), names, (x, y), PruneConfig(update=False, **settings), cache=cache)
    assert sum(k[0] == "update" for k in cache) == 1
    model = copy.deepcopy(base)
    cached = prune(model, names, (x, y), PruneConfig(update=True, **settings), cache=cache)
    assert sum(k[0] == "update" for k in cache) == 1  # found, not solved again
    fresh_model = copy.deepcopy(base)
    fresh = prune(fresh_model, names, (x, y), PruneConfig(update=True, **settings))
    for a, b in zip(cached.results, fresh.results):
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.objective == b.objective
    for (n, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        assert torch.equal(p, q), n
    # the cached copy is not the run's own: editing a result leaves the cache as it was
    cached.results[0].weights[:] = 0.0
    again = prune(copy.deepcopy(base), names, (x, y), PruneConfig(update=True, **settings), cache=cache)
    np.testing.assert_array_equal(again.results[0].weights, fresh.results[0].weights)


# ----------------------------------------------------------------------------- defaults
def test_recommended_settings_and_rejections():
    from engine.recommend import describe, recommended

    low, high = recommended("mlpnet", 0.5), recommended("mlpnet", 0.98)
    assert low["stages"] <= high["stages"] and low["first_order"] and low["update"]
    PruneConfig(sparsity=0.98, **high)  # a valid configuration
    assert "--stages" in describe(high)
    with pytest.raises(InvalidOptionError, match="'model'"):
        recommended("vgg", 0.5)
    with pytest.raises(InvalidOptionError, match="'sparsity'"):
        recommended("mlpnet", 1.0)


def test_cli_without_method_runs_the_recommendation_and_flags_override_it(shared_data, tmp_path):
    from engine.recommend import recommended

    out = tmp_path / "auto"
    code = main(["prune", "--model", "mlpnet", "--data-dir", str(shared_data), "--sparsity", "0.5",
                 "--fisher-samples", "16", "--fisher-batch", "2", "--stages", "2", "--param", "step_search_bn=true",
                 "--allocation", "uniform",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    settings = json.loads((out / "record.json").read_text())["settings"]
    rec = recommended("mlpnet", 0.5)
    assert settings["step_search_bn"] and not rec.get("step_search_bn") and recommended("resnet20", 0.9)["step_search_bn"]
    assert settings["method"] == rec["method"] and settings["first_order"] and settings["step_search"]
    assert settings["damping"] == rec["damping"] and settings["schedule"] == rec["schedule"]
    assert (settings["fisher_samples"], settings["fisher_batch"], settings["stages"]) == (16, 2, 2)
    assert settings["allocation"] == "uniform"


def _bn_net_and_data(n=6000):
    """A small convolutional network with BatchNorm and random image data (a "batchnorm" profile)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    return net, (torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,)))


def test_recommendation_without_bn_reestimate_scores_steps_on_running_statistics():
    from engine.pipeline import prepare
    from engine.recommend import Profile, recommend

    net, data = _bn_net_and_data()
    rec = recommend(Profile(8 * 27 + 80, True, 6000, True), 0.9)
    assert rec.pop("bn_reestimate") and rec.pop("bn_augment") == "crop-flip"
    run = prepare(net, data, sparsity=0.9)
    assert run.bn is not None and run.bn.augment == "crop-flip"  # the recommendation as it is, re-estimation on
    assert all(getattr(run.config, k) == v for k, v in rec.items())
    run = prepare(net, data, sparsity=0.9, bn_reestimate=False)
    assert run.bn is None and rec["step_search_bn"] and not run.config.step_search_bn
    assert all(getattr(run.config, k) == v for k, v in rec.items() if k != "step_search_bn")
    # a setting the user gives still wins, and allocation overrides the recommendation's budget
    run = prepare(net, data, sparsity=0.9, bn_reestimate=False, settings={"step_search_bn": True, "allocation": "obs"})
    assert run.bn is None and run.config.step_search_bn and run.config.allocation == "obs"
    # a named method starts from the paper-style settings: no re-estimation, no batch-statistics steps
    run = prepare(net, data, sparsity=0.9, settings={"method": "magnitude"})
    assert run.bn is None and not run.config.step_search_bn and run.config.stages == 1
    assert "--method magnitude" in run.chosen and "--no-bn-reestimate" in run.chosen


def test_resnet20_recommendation_holds_out_its_loss_samples_and_the_params_override_it():
    from engine.cli import build_parser, prune_settings
    from engine.recommend import describe, recommended

    rec = recommended("resnet20", 0.8)
    assert rec["holdout_loss"] and rec["loss_samples"] == 1000
    assert "--loss-samples 1000" in describe(rec) and "--param holdout_loss=true" in describe(rec)
    assert not recommended("mlpnet", 0.9).get("holdout_loss")
    base = ["prune", "--model", "resnet20", "--sparsity", "0.8", "--out", "x"]
    settings = prune_settings(build_parser().parse_args(base + ["--param", "holdout_loss=false"]))
    assert settings == {"holdout_loss": False}
    assert prune_settings(build_parser().parse_args(base + ["--method", "magnitude"])) == {"method": "magnitude"}
    PruneConfig(sparsity=0.8, **rec)  # valid as it stands


@pytest.mark.parametrize("flags", [["--bn-reestimate", "--no-bn-reestimate"], ["--update", "--no-update"],
                                   ["--step-search", "--no-step-search"]])
def test_cli_on_off_flags_are_exclusive(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "resnet20", "--sparsity", "0.5", *flags, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    from engine.recommend import recommends_bn_reestimate

    assert recommends_bn_reestimate("resnet20") and not recommends_bn_reestimate("mlpnet")


@pytest.mark.parametrize("model", ["mlpnet", "resnet20"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.9, 0.98])
def test_every_recommendation_builds_a_config_with_and_without_cli_overrides(model, sparsity):
    from engine.pipeline import settle
    from engine.recommend import recommended, zoo_profile

    rec = recommended(model, sparsity)
    PruneConfig(sparsity=sparsity, **rec)
    overridden, _, _ = settle(zoo_profile(model), sparsity, {"loss_samples": 500, "stages": 2})
    config = PruneConfig(sparsity=sparsity, **overridden)  # a Fisher-path flag keeps the Fisher recommendation
    assert (config.objective, config.stages, config.loss_samples) == ("fisher", 2, 500)


def test_resnet20_recommendation_is_layerwise_up_to_0_6_unless_a_fisher_setting_is_named():
    """The recommendation by sparsity: layer-wise reconstruction (ADMM, refit, BatchNorm re-estimated) for
    ResNet20 up to 0.6, the Fisher multi-stage run above; naming a method, the objective or a Fisher-path
    setting keeps the Fisher path; the seed, the executor or the parameters do not."""
    from engine.pipeline import settle
    from engine.recommend import recommend, recommended, zoo_profile

    profile = zoo_profile("resnet20")
    for sparsity in (0.5, 0.6):
        rec = recommend(profile, sparsity)
        assert (rec["objective"], rec["method"], rec["calibration_samples"], rec["bn_reestimate"]) == (
            "reconstruction", "admm", 128, True)
        assert settle(profile, sparsity, {"seed": 3, "executor": "local"})[0]["objective"] == "reconstruction"
        for named in ({"stages": 4}, {"fisher_samples": 100}, {"method": "magnitude"}, {"objective": "fisher"},
                      {"pattern": (2, 4)}):
            assert settle(profile, sparsity, named)[0].get("objective", "fisher") == "fisher", named
    assert "objective" not in recommended("resnet20", 0.8) and recommended("resnet20", 0.8)["stages"] == 8
    assert "objective" not in recommended("mlpnet", 0.5)  # no BatchNorm: the Fisher run at every sparsity
    assert settle(profile, 0.5, {"method": "obc", "objective": "reconstruction"})[0]["method"] == "obc"


def test_resnet20_recommendation_doubles_its_gradient_rows_from_0_8_and_fits_the_cifar_subset():
    """500 rows of 16 images from 0.8 up (250 below), and every ResNet20 recommendation passes prune()'s
    own sample checks on the 10,000-image CIFAR-10 training subset of ../shared/data (Fisher images plus
    the held-out loss images)."""
    from engine.recommend import recommended
    from engine.models import build_model
    from engine.pruner import check_prune_inputs

    assert recommended("resnet20", 0.7, "fisher")["fisher_samples"] == 250
    assert recommended("resnet20", 0.8)["fisher_samples"] == recommended("resnet20", 0.9)["fisher_samples"] == 500
    model = build_model("resnet20")
    names = [n for n, _ in prunable_parameters(model, "cbs")]
    for sparsity in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        rec = recommended("resnet20", sparsity, "fisher")
        check_prune_inputs(model, names, 10_000, PruneConfig(sparsity=sparsity, **rec))
        with pytest.raises(InvalidOptionError, match="'loss_samples'"):
            check_prune_inputs(model, names, rec["fisher_samples"] * rec["fisher_batch"] + 999,
                               PruneConfig(sparsity=sparsity, **rec))


def test_naming_cbs_gives_the_papers_setting():
    """--method cbs is the CBS paper's setting for the profile; another method the plain single stage."""
    from engine.pipeline import prepare
    from engine.recommend import PAPER, PAPER_CBS, PLAIN, Profile, recommend

    small = recommend(Profile(32360, False, 60000, True), 0.9, "cbs")
    assert (small["fisher_samples"], small["damping"], small["block_mode"], small["update"]) == (10000, 1e-3, "whole",
                                                                                                 True)
    other = recommend(Profile(32360, False, 60000, True), 0.9, "woodfisher")
    assert (other["fisher_samples"], other["block_mode"]) == (PLAIN["fisher_samples"], PLAIN["block_mode"])
    net, data = _bn_net_and_data()
    run = prepare(net, data, sparsity=0.5, settings={"method": "cbs", "fisher_samples": 64})
    paper = {**PAPER["batchnorm"], **PAPER_CBS["batchnorm"]}
    assert (run.config.damping, run.config.block_mode, run.config.loss_samples, run.config.solver_params) == \
        (paper["damping"], paper["block_mode"], paper["loss_samples"], paper["solver_params"])
    assert run.bn is None and run.config.stages == 1  # the paper judges without re-estimation
