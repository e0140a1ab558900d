"""Layer-wise reconstruction pruning on a toy MLP: sequential inputs, the refit, bounds, patterns, SparseGPT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from engine.layerwise import prune_layerwise, reconstruction_error
from formulations.patterns import pattern_violation


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    batches = [torch.randn(32, 8) for _ in range(3)]
    return model, ["0.weight", "2.weight"], batches


def _inputs_of_second(model, batches):
    a = torch.cat([torch.relu(model[0](x)) for x in batches]).detach().double().numpy()
    return a.T @ a / a.shape[0]


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_takes_the_pruned_inputs(sequential):
    model, names, batches = _toy()
    dense = copy.deepcopy(model)
    W2 = model[2].weight.detach().double().numpy().copy()
    masks, records = prune_layerwise(model, names, batches, sparsity=0.5, method="magnitude", sequential=sequential)
    H2 = _inputs_of_second(model if sequential else dense, batches)  # model's first layer is pruned by now
    V2 = model[2].weight.detach().double().numpy()
    assert records[1].error == pytest.approx(reconstruction_error(W2, V2, H2), rel=1e-5)
    assert all(int(m.sum()) == m.numel() // 2 for m in masks.values())
    other = _inputs_of_second(dense if sequential else model, batches)
    assert not np.allclose(H2, other)  # the two modes differ on this toy


def test_refit_beats_masking_and_bounds_hold():
    model, names, batches = _toy(1)
    W1 = model[0].weight.detach().double().numpy().copy()
    a = torch.cat(batches).double().numpy()
    H1 = a.T @ a / a.shape[0]
    masks, records = prune_layerwise(model, names, batches, sparsity=0.5, method="brute_force")
    kept = masks["0.weight"].numpy()
    assert records[0].error <= reconstruction_error(W1, np.where(kept, W1, 0.0), H1) + 1e-9
    for r in records:
        assert r.bound is not None and r.bound <= r.objective * (1 + 1e-9) and r.rows_proven == 1.0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "woodfisher", "sparsegpt"])
def test_two_four_rows_on_every_pattern_method(method):
    model, names, batches = _toy(2)
    masks, records = prune_layerwise(model, names, batches, pattern=(2, 4), method=method)
    for name, m in masks.items():
        assert all(pattern_violation(row, (2, 4)) is None for row in m.numpy())
    for r in records:
        assert r.bound is not None and r.bound <= r.objective * (1 + 1e-9)
    assert bool((model[0].weight[~masks["0.weight"]] == 0).all())  # pruned weights are zero in the model


def test_sparsegpt_refit_is_no_worse_than_its_own_weights():
    from formulations.sparsegpt import sparsegpt

    model, names, batches = _toy(3)
    W1 = model[0].weight.detach().double().numpy().copy()
    a = torch.cat(batches).double().numpy()
    H1 = a.T @ a / a.shape[0]
    lam = 0.01 * np.mean(np.diag(H1))
    own, kept = sparsegpt(W1, H1 + lam * np.eye(8), 0.5)
    _, records = prune_layerwise(model, names, batches, sparsity=0.5, method="sparsegpt")
    damped_own = 0.5 * float(np.einsum("oi,ij,oj->", own - W1, H1 + lam * np.eye(8), own - W1))
    assert records[0].objective <= damped_own + 1e-9
    assert records[0].method_error == pytest.approx(reconstruction_error(W1, own, H1), rel=1e-9)
    assert records[0].kept == int(kept.sum())


def test_bad_inputs():
    from engine.errors import CBSError, InvalidOptionError

    model, names, batches = _toy()
    with pytest.raises(InvalidOptionError, match="'sparsity' argument of prune_layerwise"):
        prune_layerwise(model, names, batches, sparsity=1.0)
    with pytest.raises(InvalidOptionError, match="'calibration'"):
        prune_layerwise(model, names, [], sparsity=0.5)
    for bad in (-1.0, float("inf"), True, "1"):
        with pytest.raises(InvalidOptionError, match="'certify_time' argument of prune_layerwise"):
            prune_layerwise(model, names, batches, sparsity=0.5, certify_time=bad)
    with pytest.raises(InvalidOptionError, match="M dividing every layer's d_in"):
        prune_layerwise(model, names, batches, pattern=(2, 5))
    emb = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    with pytest.raises(CBSError, match="is a Embedding"):
        prune_layerwise(emb, ["0.weight"], [torch.zeros(2, 3, dtype=torch.long)], sparsity=0.5)


def _cli(tmp_path, *extra):
    return ["prune", "--model", "mlpnet", "--objective", "reconstruction", "--calibration-samples", "64",
            "--out", str(tmp_path / "o"), "--no-progress", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "0.6", "--pattern", "2:4"], "'sparsity' argument of prune() must be 1 - N/M = 0.5"),
    (["--sparsity", "0.5", "--pattern", "4:4"], "'unstructured' or N:M with integers 1 <= N < M"),
    (["--sparsity", "0.5", "--pattern", "1:2", "--method", "greedy"], "sparsegpt or a solver that honours N:M"),
    (["--sparsity", "2/3", "--pattern", "1:3"], "must be a number in [0, 1)"),
    (["--sparsity", "0.5", "--calibration-samples", "70000"], "at most the 60000 training samples"),
    (["--sparsity", "0.5", "--stages", "4"], "'stages' argument of prune() must be 1 with objective 'reconstruction'"),
])
def test_cli_rejections_before_any_work(tmp_path, capsys, extra, message):
    argv = _cli(tmp_path, *extra)
    try:
        code = __import__("engine.cli", fromlist=["main"]).main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_fisher_objective_refuses_sparsegpt(tmp_path, capsys):
    from engine.cli import main

    assert main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "sparsegpt",
                 "--out", str(tmp_path / "b")]) == 2
    assert "sparsegpt needs objective 'reconstruction'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--sparsity", "0.5", "--method", "wanda"],
                                   ["--sparsity", "0.5", "--pattern", "2:4", "--method", "sparsegpt"]])
def test_cli_reconstruction_end_to_end_on_mlpnet(tmp_path, shared_data, capsys, extra):
    import json

    from engine.cli import main

    assert main(_cli(tmp_path, *extra, "--data-dir", str(shared_data))) == 0
    rec = json.loads((tmp_path / "o" / "record.json").read_text())
    assert rec["settings"]["objective"] == "reconstruction" and rec["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rec["accuracy"] > 85 and len(rec["blocks"]) == 3
    for b in rec["blocks"]:
        assert b["bound"] <= b["objective"] * (1 + 1e-9) and b["extra"]["reconstruction_error"] >= 0
    assert "--objective reconstruction" in rec["recommendation"]
    if "--pattern" in extra:
        mask = torch.load(tmp_path / "o" / "mask.pt", weights_only=True)
        assert all(pattern_violation(row, (2, 4)) is None for m in mask.values() for row in m.numpy())


def test_the_recommendation_under_a_pattern_is_a_pattern_method():
    from engine.pipeline import prepare

    model, _, batches = _toy()
    x = torch.cat(batches)
    run = prepare(model, (x, torch.zeros(len(x), dtype=torch.long)), sparsity=0.5,
                  settings={"objective": "reconstruction", "pattern": "2:4", "calibration_samples": 32})
    assert run.config.method == "admm" and "--pattern 2:4" in run.chosen
    run = prepare(model, (x, torch.zeros(len(x), dtype=torch.long)), sparsity=0.5,
                  settings={"objective": "reconstruction"})
    assert run.config.method == "admm" and run.config.stages == 1
    assert run.config.calibration_samples == len(x)  # shrunk to the data


def test_without_refit_the_method_weights_are_written():
    model, names, batches = _toy(4)
    W1 = model[0].weight.detach().clone()
    masks, records = prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.5, method="sparsegpt",
                                     refit=False)
    assert records[0].error == pytest.approx(records[0].method_error, rel=1e-9)
    pruned = copy.deepcopy(model)
    masks, records = prune_layerwise(pruned, names, batches, sparsity=0.5, method="magnitude", refit=False)
    assert torch.equal(pruned[0].weight, torch.where(masks["0.weight"], W1, torch.zeros_like(W1)))
    refitted = copy.deepcopy(model)
    _, again = prune_layerwise(refitted, names, batches, sparsity=0.5, method="magnitude", sequential=False)
    assert again[0].error <= records[0].error + 1e-12 and again[0].bound == pytest.approx(records[0].bound)


@pytest.mark.parametrize("allocation", ["magnitude", "obs"])
def test_row_budgets_within_a_layer_sum_to_its_budget(allocation):
    model, names, batches = _toy(5)
    masks, _ = prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.6, method="woodfisher",
                               sequential=False, allocation=allocation)
    for name, m in masks.items():
        assert int(m.sum()) == int(round(0.4 * m.numel()))
    from engine.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="uniform with an N:M pattern"):
        prune_layerwise(copy.deepcopy(model), names, batches, pattern=(2, 4), allocation=allocation)


def test_loss_curve_budgets_span_the_layers_and_beat_uniform_in_relative_error():
    """The knapsack splits the whole budget over both layers; its summed relative error (each layer's error
    over its dense output energy wᵀHw) is at most uniform's, whose budgets are points of its grid."""
    model, names, batches = _toy(5)
    a = torch.cat(batches).double().numpy()
    hs = [a.T @ a / a.shape[0], _inputs_of_second(model, batches)]
    ws = [model[0].weight.detach().double().numpy(), model[2].weight.detach().double().numpy()]
    energy = [float(np.einsum("oi,ij,oj->", W, H, W)) for W, H in zip(ws, hs)]
    masks, records = prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.6, method="woodfisher",
                                     sequential=False, allocation="loss_curve")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(round(0.4 * total))
    _, uniform = prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.6, method="woodfisher",
                                 sequential=False)
    relative = sum(r.objective / e for r, e in zip(records, energy))
    assert relative <= sum(r.objective / e for r, e in zip(uniform, energy)) * (1 + 1e-6)
    from engine.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="uniform with an N:M pattern"):
        prune_layerwise(copy.deepcopy(model), names, batches, pattern=(2, 4), allocation="loss_curve")


def test_checks_come_before_any_layer_is_pruned():
    from engine.errors import InvalidOptionError

    model, names, batches = _toy()
    before = copy.deepcopy(model.state_dict())
    # the first layer (d_in 8) fits 1:8, the second (d_in 12) does not: nothing may be pruned
    with pytest.raises(InvalidOptionError, match="M dividing every layer's d_in, its input size \\(2.weight: 12\\)"):
        prune_layerwise(model, names, batches, pattern=(1, 8), method="magnitude")
    with pytest.raises(InvalidOptionError, match="'method' argument of prune_layerwise\\(\\) must be sparsegpt or a "
                                                 "solver that honours N:M patterns"):
        prune_layerwise(model, names, batches, pattern=(2, 4), method="greedy")
    with pytest.raises(InvalidOptionError, match="'allocation' argument of prune_layerwise\\(\\) must be uniform, "
                                                 "magnitude, obs or loss_curve"):
        prune_layerwise(model, names, batches, sparsity=0.5, allocation="knapsack")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_row_budgets_set_every_rows_count_and_are_checked():
    from engine.errors import InvalidOptionError

    model, names, batches = _toy(4)
    ks = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 4, 2]  # the first layer: 12 rows of 8 inputs
    masks, records = prune_layerwise(model, names, batches, sparsity=0.5, method="greedy",
                                     row_budgets={"0.weight": ks})
    assert masks["0.weight"].sum(1).tolist() == ks
    assert masks["2.weight"].sum(1).tolist() == [6] * 4  # the other layer keeps the uniform budget
    for bad in ([1] * 11, [9] * 12):
        with pytest.raises(InvalidOptionError, match="row_budgets"):
            prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.5, method="greedy",
                            row_budgets={"0.weight": bad})
    with pytest.raises(InvalidOptionError, match="row_budgets"):
        prune_layerwise(copy.deepcopy(model), names, batches, sparsity=0.5, method="sparsegpt",
                        row_budgets={"0.weight": ks})
