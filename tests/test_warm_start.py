"""``warm_start``: a multi-stage Fisher run whose stages up to s₀ are one layer-wise reconstruction to s₀
(engine.pruner.stage_schedule, engine.reconstruction.warm_stage), and the recommendation that uses it for BatchNorm
models above 0.7. Oracles: the poly schedule's closed form, and the layer-wise run on its own (the first stage
must be exactly it). Real runs on the digits shipped inside the package."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import PruneConfig
from engine.data import load_digits
from engine.errors import InvalidOptionError
from engine.models import small_mlp
from engine.pipeline import settle
from engine.pruner import check_prune_inputs, prune, stage_schedule
from engine.recommend import Profile, recommend, warm_start_for, zoo_profile
from engine.reconstruction import prune_reconstruction, warm_config, warm_stage
from engine.sources import as_samples


def _poly(target: float, stages: int) -> list[float]:
    return [target - target * (1 - t / stages) ** 3 for t in range(1, stages + 1)]


@pytest.mark.parametrize("target, stages, warm", [(0.8, 8, 0.7), (0.9, 12, 0.7), (0.6, 4, 0.1)])
def test_stage_schedule_replaces_the_stages_up_to_the_warm_start_by_one(target, stages, warm):
    cold = PruneConfig(sparsity=target, stages=stages, schedule="poly")
    assert stage_schedule(cold) == pytest.approx(_poly(target, stages))
    got = stage_schedule(PruneConfig(sparsity=target, stages=stages, schedule="poly", warm_start=warm))
    expected = [warm, *(s for s in _poly(target, stages) if s > warm + 1e-9)]
    assert got == pytest.approx(expected) and got[0] == warm and got[-1] == target
    if (target, warm) == (0.8, 0.7):  # 0.8 − 0.8 · (1/2)³ is 0.7 up to rounding: that stage is the warm one
        assert got == pytest.approx([0.7, 0.7578125, 0.7875, 0.7984375, 0.8])


@pytest.fixture(scope="module")
def digits():
    train = load_digits("train")
    torch.manual_seed(0)
    model = small_mlp(64, (32, 16), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.images.reshape(len(train.images), -1).float(), train.labels
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    return model, names, as_samples((x, y), "train")


def test_the_first_stage_is_the_layerwise_run_and_the_fisher_stages_only_prune_more(digits):
    base, names, train = digits
    config = PruneConfig(sparsity=0.8, stages=8, schedule="poly", warm_start=0.7, method="magnitude", update=True,
                         first_order=True, step_search=True, fisher_samples=100, loss_samples=200,
                         calibration_samples=64, seed=3, certify_time=0.0, progress=False)
    alone = copy.deepcopy(base)
    layerwise = prune_reconstruction(alone, names, train, warm_config(config))
    assert layerwise.achieved_sparsity == pytest.approx(0.7, abs=1e-3)

    model, seen = copy.deepcopy(base), []
    report = prune(model, names, train, config,
                   on_stage=lambda record, m: seen.append({n: p.detach().clone() for n, p in m.named_parameters()}))
    assert len(report.stages) == len(stage_schedule(config)) == 5
    first = report.stages[0]
    assert first.objective_total is None and first.n_keep == layerwise.n_keep
    assert first.extra["warm_start"]["allocation"] == "loss_curve" and first.extra["warm_start"]["method"] == "admm"
    wanted = dict(alone.named_parameters())
    for n in wanted:  # after stage 1 the model is the layer-wise run's, bit for bit
        assert torch.equal(seen[0][n], wanted[n].detach()), n
    assert report.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
    for n in names:  # pruned once, pruned for good
        assert not (report.masks[n] & ~layerwise.masks[n]).any(), n
    assert all(r.objective_total is not None for r in report.stages[1:])


@pytest.mark.parametrize("settings, argument", [
    (dict(sparsity=0.5, warm_start=0.7), "warm_start"),
    (dict(sparsity=0.7, warm_start=0.7), "warm_start"),
    (dict(sparsity=0.8, warm_start=0.7, objective="reconstruction"), "warm_start"),
    (dict(sparsity=0.5, warm_start=0.3, pattern="2:4", allocation="uniform"), "warm_start"),
    (dict(sparsity=0.8, warm_start=1.0), "warm_start"),
    (dict(sparsity=0.8, warm_start=-0.1), "warm_start"),
])
def test_a_bad_warm_start_is_refused_naming_it(settings, argument):
    with pytest.raises(InvalidOptionError, match=f"'{argument}'"):
        PruneConfig(**settings)


def test_the_layerwise_stage_is_checked_before_any_work(digits):
    base, names, train = digits
    config = PruneConfig(sparsity=0.8, stages=4, warm_start=0.5, fisher_samples=10, calibration_samples=10**6)
    with pytest.raises(InvalidOptionError, match="'calibration_samples'.*at most the"):
        check_prune_inputs(base, names, len(train), config)


def test_the_recommendation_warm_starts_batchnorm_models_above_0_6_only():
    """WARM_START: from 0.6 up to 0.7, from 0.7 above; layer-wise alone up to 0.6 (LAYERWISE_UP_TO)."""
    resnet = zoo_profile("resnet20")
    assert recommend(resnet, 0.8)["warm_start"] == 0.7 and recommend(resnet, 0.9)["warm_start"] == 0.7
    assert recommend(resnet, 0.7)["warm_start"] == 0.6 and recommend(resnet, 0.65)["warm_start"] == 0.6
    assert recommend(resnet, 0.8, objective="fisher")["warm_start"] == 0.7
    assert recommend(resnet, 0.6)["objective"] == "reconstruction"
    assert warm_start_for("batchnorm", 0.6) is None and warm_start_for("batchnorm", 0.75) == 0.7
    assert "warm_start" not in recommend(resnet, 0.6, objective="fisher")
    assert "warm_start" not in recommend(resnet, 0.8, method="cbs")
    assert "warm_start" not in recommend(zoo_profile("mlpnet"), 0.9)
    assert "warm_start" not in recommend(Profile(10**7, False, 10**5, False), 0.9)
    merged, _, _ = settle(resnet, 0.8, {"warm_start": None})  # --warm-start none: from the dense model
    assert merged["warm_start"] is None and merged["stages"] == 8
    merged, _, _ = settle(resnet, 0.5, {"pattern": (2, 4), "objective": "fisher"})
    assert "warm_start" not in merged
    merged, _, _ = settle(resnet, 0.8, {"stages": 12})  # a Fisher flag keeps the warm start
    assert merged["warm_start"] == 0.7 and PruneConfig(sparsity=0.8, **merged).stages == 12


def test_warm_start_none_on_the_command_line_overrides_the_recommendation():
    """A nullable flag given as `none` is a setting the user gave (it must beat the recommendation's 0.7); a flag
    not given is not."""
    from engine.cli import build_parser
    from engine.settings import PRUNE_OPTIONS, given_flags

    base = ["prune", "--model", "resnet20", "--sparsity", "0.8", "--out", "x"]
    parser = build_parser()
    assert given_flags(parser.parse_args(base + ["--warm-start", "none"]), PRUNE_OPTIONS)["warm_start"] is None
    assert given_flags(parser.parse_args(base + ["--warm-start", "0.6"]), PRUNE_OPTIONS)["warm_start"] == 0.6
    assert "warm_start" not in given_flags(parser.parse_args(base), PRUNE_OPTIONS)
    merged, _, _ = settle(zoo_profile("resnet20"), 0.8, given_flags(parser.parse_args(base + ["--warm-start", "none"]),
                                                                    PRUNE_OPTIONS))
    assert merged["warm_start"] is None


@pytest.mark.parametrize("call, argument", [
    (lambda: stage_schedule({"sparsity": 0.8}), "config"),
    (lambda: warm_config(PruneConfig(sparsity=0.8)), "config"),
    (lambda: warm_config("fisher"), "config"),
    (lambda: warm_start_for(None, 0.8), "kind"),
    (lambda: warm_start_for("batchnorm", 1.0), "sparsity"),
    (lambda: warm_start_for("batchnorm", True), "sparsity"),
    (lambda: warm_stage(object()), "run"),
])
def test_the_warm_start_helpers_refuse_bad_input_naming_it(call, argument):
    with pytest.raises(InvalidOptionError, match=f"'{argument}'"):
        call()

