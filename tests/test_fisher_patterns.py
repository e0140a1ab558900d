"""N:M patterns on the Fisher objective: blocks made of rows keep N of every M inputs, every method that
honours patterns is checked against the pattern, the exact one against brute force over pattern supports,
and settings that cannot hold a pattern are refused before any work."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import PruneConfig
from engine.errors import InvalidOptionError
from engine.pruner import prune
from formulations.patterns import pattern_violation


def _toy(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    return model, ["0.weight", "2.weight"], (x, y)


def _config(**kw):
    base = dict(sparsity=0.5, pattern=(2, 4), stages=1, allocation="uniform", fisher_samples=32, fisher_batch=1,
                damping=1e-3, block_mode="row", progress=False)
    return PruneConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["magnitude", "woodfisher", "swap", "iht", "admm", "brute_force"])
def test_every_row_keeps_two_of_four(method):
    model, names, data = _toy()
    report = prune(model, names, data, _config(method=method))
    assert set(report.masks) == set(names)
    for mask in report.masks.values():
        assert all(pattern_violation(r, (2, 4)) is None for r in mask.reshape(mask.shape[0], -1).numpy())
    assert all(b.k == b.n // 2 for b in report.blocks)


def test_brute_force_is_the_pattern_optimum_of_each_row_block():
    """The exact method's E on each row equals the minimum, enumerated here, over all 2:4 supports of the
    row problem the stage built (read back from the run's problem cache)."""
    from formulations import objective as obj

    model, names, data = _toy(1)
    cache: dict = {}
    report = prune(model, names, data, _config(method="brute_force"), cache=cache)
    (_, _, problems, _), = [v for k, v in cache.items() if k[0] != "update"]
    assert len(problems) == len(report.blocks) == 4 + 3
    for p, rec in zip(problems, report.blocks):
        groups = [itertools.combinations(range(g, g + 4), 2) for g in range(0, p.n, 4)]
        best = min(obj.support_objective(p.with_n_keep(p.n // 2), np.isin(np.arange(p.n), sum(choice, ())))
                   for choice in itertools.product(*groups))
        assert rec.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert rec.status == "optimal" and rec.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("kw, message", [
    (dict(stages=3), "'stages' argument of prune() must be 1 with pattern 2:4"),
    (dict(allocation="obs"), "'allocation' argument of prune() must be 'uniform' with pattern 2:4"),
    (dict(sparsity=0.6), "1 - N/M = 0.5 with pattern 2:4"),
])
def test_config_refusals(kw, message):
    with pytest.raises(InvalidOptionError) as info:
        _config(**kw)
    assert message in str(info.value)


@pytest.mark.parametrize("kw, message", [
    (dict(method="greedy"), "solver that honours N:M patterns"),
    (dict(pattern=(2, 8), sparsity=0.75), "M dividing every pruned row's length (2.weight: 4)"),
    (dict(block_mode="chunk", block_size=6), "'block_size' argument of prune() must be a multiple of M = 4"),
])
def test_refusals_before_any_work(kw, message):
    model, names, data = _toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InvalidOptionError) as info:
        prune(model, names, data, _config(**{"method": "magnitude", **kw}))
    assert message in str(info.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_transposed_weight_needs_row_blocks():
    model, names, data = _toy()
    with pytest.raises(InvalidOptionError, match="'row' with a pattern when a pruned weight is stored transposed"):
        prune(model, names, data, _config(method="magnitude", block_mode="layer"), transposed=frozenset({"0.weight"}))


def test_cli_fisher_two_four_on_mlpnet(tmp_path, shared_data):
    import json

    from engine.cli import main

    out = tmp_path / "o"
    assert main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--pattern", "2:4", "--method", "woodfisher",
                 "--fisher-samples", "64", "--data-dir", str(shared_data), "--out", str(out), "--no-progress"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["settings"]["pattern"] == [2, 4] and rec["settings"]["stages"] == 1 and rec["accuracy"] > 85
    mask = torch.load(out / "mask.pt", weights_only=True)
    assert all(pattern_violation(r, (2, 4)) is None for m in mask.values() for r in m.reshape(m.shape[0], -1).numpy())
