"""Sparse training (engine.training), ghost devices (engine.ghost), mask sources (engine.sparse_masks), cbs train.

Oracles: the original model (exact state-dict keys, module types, parameter count, outputs), numpy float64
formulas (soft activations, SNIP, SynFlow), finite differences (GraSP's Hessian-gradient product), and an
uninterrupted run (resume). The small cases train on the bundled 8x8 digits, so they need no shared data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from engine.cli import main
from engine.data import load_digits
from engine.errors import CheckpointError, DataNotFoundError, InvalidOptionError
from engine.ghost import GhostSkip, SoftActivation, SoftNeurons
from engine.models import MLP, MLPNet, ResNet20, small_mlp
from engine.sparse_masks import load_mask_file, make_mask, mask_scores, mask_sparsity, select_mask
from engine.training import TrainConfig, apply_masks, count_parameters, rescale_init, train


def _digits_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return small_mlp()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def _structure(model: nn.Module) -> list[tuple[str, str, tuple]]:
    return [(n, type(m).__name__, ()) for n, m in model.named_modules()] + [
        (k, "tensor", tuple(v.shape)) for k, v in model.state_dict().items()
    ]


def _random_mask(model: nn.Module, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    return make_mask(model, names, "random", sparsity, scope="layerwise", seed=seed)


# ----------------------------------------------------------------------------------- ghost devices
@pytest.mark.parametrize("kind,reference", [
    ("silu", lambda x, b: x / (1 + np.exp(-b * x))),
    ("mish", lambda x, b: x * np.tanh(np.log1p(np.exp(b * x)))),
    ("softplus", lambda x, b: np.log1p(np.exp(b * x)) / b),
    ("elu", lambda x, b: np.where(x > 0, x, (np.exp(b * x) - 1) / b)),
])
def test_soft_activation_matches_numpy_and_tends_to_relu(kind, reference):
    x = np.linspace(-6, 6, 241)
    for beta in (1.0, 3.0):
        got = SoftActivation(kind, beta)(torch.tensor(x, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, reference(x, beta), rtol=1e-10, atol=1e-12)
    # |φ(βx)/β − relu(x)| = |φ(u) − relu(u)| / β, so the gap shrinks like 1/β
    sharp = SoftActivation(kind, 1000.0)(torch.tensor(x, dtype=torch.float64)).numpy()
    assert np.max(np.abs(sharp - np.maximum(x, 0))) <= 1e-3 + 1e-12  # sup |φ(u) − relu(u)| ≤ 1 (ELU: exactly 1)


def test_soft_neurons_replace_and_restore_relus():
    model = ResNet20()
    before = _structure(model)
    relus = [m for m in model.modules() if type(m) is nn.ReLU]
    soft = SoftNeurons(model, "mish")
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert soft.set_progress(0.5) == pytest.approx(10.0)  # geometric 1 -> 100
    soft.remove()
    assert _structure(model) == before
    assert [m for m in model.modules() if type(m) is nn.ReLU] == relus  # the very same objects


@pytest.mark.parametrize("make,shape", [(ResNet20, (4, 3, 32, 32)), (MLPNet, (4, 1, 28, 28)), (small_mlp, (4, 64)),
                                        (lambda: MLP(8, (8, 8), 8), (4, 8))])
def test_ghost_skip_is_exact_at_scale_zero_and_removable(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    reference = model(x).detach()
    before, count = _structure(model), count_parameters(model)
    ghost = GhostSkip(model)
    identity = shape == (4, 8)  # equal widths: parameter-free identity skips
    assert (ghost.n_ghost_parameters() == 0) == identity
    near = model(x).detach()  # scale 1, branches initialised at 1e-4: a small perturbation, not zero
    if identity:  # x added to the output two layers up, at full scale
        torch.testing.assert_close(near, reference + _mlp_identity_reference(model, x))
    else:
        assert 0 < float((near - reference).abs().max()) < 1e-2 * float(reference.abs().max()) + 1e-3
    ghost.set_progress(1.0)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    ghost.remove()
    assert _structure(model) == before and count_parameters(model) == count
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def _mlp_identity_reference(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """Output change of identity ghost skips (h_{i-1} added to fc_{i+1}'s output), recomputed by hand."""
    relu, lin = torch.relu, nn.functional.linear  # functional: the modules' hooks must not fire here
    w1, w2, w3 = (getattr(model, f"fc{i}").weight.detach() for i in (1, 2, 3))
    h1 = relu(lin(x, w1))
    a3 = lin(relu(lin(h1, w2) + x), w3) + h1
    plain = lin(relu(lin(h1, w2)), w3)
    return a3.detach() - plain


def test_ghost_rejections():
    with pytest.raises(InvalidOptionError, match="'model' argument of GhostSkip"):
        GhostSkip(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(InvalidOptionError, match="'soft_activation'"):
        SoftActivation("tanh")
    with pytest.raises(InvalidOptionError, match="'beta_end' argument of SoftNeurons"):
        SoftNeurons(small_mlp(), beta_start=10.0, beta_end=2.0)


# ----------------------------------------------------------------------------------- mask sources
def test_selection_counts_global_and_layerwise():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(40, 10, generator=g), "b": torch.rand(7, generator=g) + 1}
    glob = select_mask(scores, 0.9, "global")
    assert sum(int(m.sum()) for m in glob.values()) == round(0.1 * 407)
    assert int(glob["b"].sum()) == 7  # the larger scores are kept first
    lay = select_mask(scores, 0.9, "layerwise")
    assert int(lay["a"].sum()) == 40 and int(lay["b"].sum()) == 1
    flat = np.concatenate([scores["a"].numpy().ravel(), scores["b"].numpy()])
    threshold = np.sort(flat)[::-1][round(0.1 * 407) - 1]
    kept = np.concatenate([glob["a"].numpy().ravel(), glob["b"].numpy()])
    assert flat[kept].min() >= threshold > flat[~kept].max()


def test_random_and_magnitude_masks():
    model = small_mlp()
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    masks = make_mask(model, names, "random", 0.75, scope="layerwise", seed=3)
    for n in names:
        assert int(masks[n].sum()) == round(0.25 * dict(model.named_parameters())[n].numel())
    assert not torch.equal(masks["fc1.weight"], make_mask(model, names, "random", 0.75, scope="layerwise", seed=4)["fc1.weight"])
    mag = make_mask(model, ["fc1.weight"], "magnitude", 0.5)["fc1.weight"]
    w = model.fc1.weight.detach().abs()
    assert float(w[mag].min()) >= float(w[~mag].max())


def test_snip_scores_match_numpy_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    scores = mask_scores(model, ["0.weight"], "snip", x, y, batch_size=20)["0.weight"].numpy()
    w, xn = model[0].weight.detach().double().numpy(), x.double().numpy()
    z = xn @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y.numpy()]).T @ xn / 20
    np.testing.assert_allclose(scores, np.abs(grad * w), rtol=1e-4, atol=1e-7)


def test_grasp_hessian_gradient_product_matches_finite_differences():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = ["0.weight", "2.weight"]
    scores = mask_scores(model, names, "grasp", x, y, batch_size=16)
    params = [model[0].weight, model[2].weight]

    def grad_at() -> list[torch.Tensor]:
        loss = nn.functional.cross_entropy(model(x) / 200.0, y)
        return [g.detach().clone() for g in torch.autograd.grad(loss, params)]

    g = grad_at()
    eps = 1e-4
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(eps * gi)
    plus = grad_at()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.sub_(2 * eps * gi)
    minus = grad_at()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(eps * gi)
    for n, p, a, b in zip(names, params, plus, minus):
        hg = (a - b) / (2 * eps)
        np.testing.assert_allclose(scores[n].double().numpy(), (p.detach() * hg).numpy(), rtol=1e-3, atol=1e-9)


def test_synflow_one_round_matches_closed_form():
    model = small_mlp()
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    scores = mask_scores(model, names, "synflow")
    w1, w2, w3 = (np.abs(getattr(model, f"fc{i}").weight.detach().double().numpy()) for i in (1, 2, 3))
    # R = 1ᵀ|W3||W2||W1|1 (ReLU is the identity on positive inputs): ∂R/∂W1_ij = (1ᵀ|W3||W2|)_i
    expected = w1 * np.outer(np.ones(10) @ w3 @ w2, np.ones(64))
    np.testing.assert_allclose(scores["fc1.weight"].double().numpy(), expected, rtol=1e-5)
    masks = make_mask(model, names, "synflow", 0.9, synflow_rounds=5)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * sum(m.numel() for m in masks.values()))


def test_mask_file_formats_and_rejections(tmp_path):
    model = small_mlp()
    masks = _random_mask(model, 0.5)
    variants = {
        "plain.pt": {k: v.float() for k, v in masks.items()},
        "bool.pt": dict(masks),
        "module.pt": {f"module.{k}": v.to(torch.uint8) for k, v in masks.items()},
        "buffers.pt": {k.replace(".weight", ".weight_mask"): v.float() for k, v in masks.items()},
        "woodfisher.pt": {k.replace(".weight", "._weight_mask"): v.float() for k, v in masks.items()},
    }
    for name, sd in variants.items():
        torch.save(sd, tmp_path / name)
        loaded = load_mask_file(tmp_path / name, model)
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks), name
    bad = {
        "unknown.pt": ({"fc9.weight": torch.ones(3)}, "not a parameter"),
        "shape.pt": ({"fc1.weight": torch.ones(3, 3)}, "has shape"),
        "values.pt": ({"fc1.weight": torch.full((32, 64), 0.5)}, "other than 0 and 1"),
        "empty.pt": ({}, "non-empty dict"),
    }
    for name, (sd, message) in bad.items():
        torch.save(sd, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_mask_file(tmp_path / name, model)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_mask_file(tmp_path / "missing.pt", model)


# ----------------------------------------------------------------------------------- training
def test_tost_run_ends_as_the_plain_masked_architecture(digits, tmp_path):
    (xtr, ytr), (xte, yte) = digits
    model = _digits_model()
    reference = _digits_model()
    masks = _random_mask(model, 0.8)
    config = TrainConfig.recipe("tost", epochs=3, ghost_epochs=2, lr=0.1, batch_size=64, gradinit_iterations=10)
    seen = []
    rec = train(model, masks, (xtr, ytr), (xte, yte), config, out=tmp_path, on_epoch=seen.append)
    assert [e["ghost_active"] for e in seen] == [True, False, False]
    assert rec["history"][0]["beta"] is not None and rec["finished"]
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert bool((params[n][~m] == 0).all())  # exactly zero
        assert bool((params[n][m] != 0).all())
    assert rec["achieved_sparsity"] == pytest.approx(mask_sparsity(masks))
    assert _structure(model) == _structure(reference)
    assert rec["parameter_count"] == rec["original_parameter_count"] == count_parameters(reference)
    assert all(type(getattr(model, f"relu{i}")) is nn.ReLU for i in (1, 2))
    assert not model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # model.pt loads strictly into the plain class and scores what the record says
    fresh = small_mlp()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    from engine.evaluate import evaluate

    assert evaluate(fresh, xte, yte)[0] == pytest.approx(rec["final_accuracy"])
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["final_accuracy"] == rec["final_accuracy"] and len(on_disk["history"]) == 3
    assert rec["gradinit"]["scales"] and min(rec["gradinit"]["scales"].values()) >= 0.01


@pytest.mark.parametrize("recipe", ["plain", "tost"])
def test_resume_equals_uninterrupted(digits, tmp_path, recipe):
    (xtr, ytr), (xte, yte) = digits
    config = TrainConfig.recipe(recipe, epochs=3, ghost_epochs=2, lr=0.1, batch_size=64, gradinit_iterations=5, seed=7)
    masks = _random_mask(_digits_model(), 0.7)
    whole = _digits_model()
    rec_whole = train(whole, masks, (xtr, ytr), (xte, yte), config, out=tmp_path / "whole")
    cut = _digits_model()
    partial = train(cut, masks, (xtr, ytr), (xte, yte), config, out=tmp_path / "cut", stop_after=1)
    assert not partial["finished"] and partial["epochs_done"] == 1
    resumed = _digits_model(seed=99)  # a different init: everything must come from the checkpoint
    rec_cut = train(resumed, masks, (xtr, ytr), (xte, yte), config, out=tmp_path / "cut", resume=True)
    assert rec_cut["finished"]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)
    assert [h["test_accuracy"] for h in rec_cut["history"]] == [h["test_accuracy"] for h in rec_whole["history"]]
    # a finished run is returned as recorded
    again = train(_digits_model(), masks, (xtr, ytr), (xte, yte), config, out=tmp_path / "cut", resume=True)
    assert again["final_accuracy"] == rec_cut["final_accuracy"]


def test_rescale_init_keeps_zeros_and_scales_whole_tensors(digits):
    (xtr, ytr), _ = digits
    model = _digits_model()
    masks = _random_mask(model, 0.9)
    apply_masks(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = rescale_init(model, masks, xtr, ytr, step_size=0.1, iterations=20, lr=0.05, min_scale=0.3)
    for n, p in model.named_parameters():
        alpha = info["scales"][n]
        assert alpha >= 0.3
        torch.testing.assert_close(p.detach(), alpha * before[n] * masks[n], rtol=1e-6, atol=0)


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "'epochs' argument of train() must be an integer >= 1. Got 0."),
    ("lr", -0.1, "'lr' argument of train() must be a finite number > 0.0"),
    ("momentum", 1.0, "'momentum' argument of train() must be in [0.0, 1.0)"),
    ("label_smoothing", 1.5, "'label_smoothing' argument of train() must be in [0.0, 1.0). Got 1.5."),
    ("ghost_epochs", 11, "'ghost_epochs' argument of train() must be None or an integer in [1, epochs = 10]. Got 11."),
    ("soft_activation", "tanh", "'soft_activation' argument of train() must be one of silu, mish, softplus, elu"),
    ("gradinit_min_scale", 0.0, "'gradinit_min_scale' argument of train() must be in (0.0, 1.0]"),
    ("ghost_skip", 1, "'ghost_skip' argument of train() must be True or False. Got 1."),
    ("seed", -1, "'seed' argument of train() must be an integer >= 0. Got -1."),
])
def test_config_rejections(field, value, message):
    with pytest.raises(InvalidOptionError) as info:
        TrainConfig(**{field: value})
    assert message in str(info.value)
    with pytest.raises(InvalidOptionError, match="'recipe'"):
        TrainConfig.recipe("fast")


def test_train_rejections(digits, tmp_path):
    (xtr, ytr), (xte, yte) = digits
    model = _digits_model()
    config = TrainConfig(epochs=1)
    with pytest.raises(InvalidOptionError, match="'masks' argument of train\\(\\) must be keyed by parameter names"):
        train(model, {"fc7.weight": torch.ones(2)}, (xtr, ytr), (xte, yte), config)
    with pytest.raises(InvalidOptionError, match="a tensor of shape \\(32, 64\\)"):
        train(model, {"fc1.weight": torch.ones(3, 3)}, (xtr, ytr), (xte, yte), config)
    with pytest.raises(InvalidOptionError, match="'train_data'"):
        train(model, _random_mask(model, 0.5), (xtr, ytr[:5]), (xte, yte), config)
    with pytest.raises(InvalidOptionError, match="'stop_after'"):
        train(model, _random_mask(model, 0.5), (xtr, ytr), (xte, yte), config, stop_after=0)
    masks = _random_mask(model, 0.5)
    train(model, masks, (xtr, ytr), (xte, yte), config, out=tmp_path)
    with pytest.raises(InvalidOptionError, match="holds a run \\(checkpoint.pt\\): pass resume"):
        train(_digits_model(), masks, (xtr, ytr), (xte, yte), config, out=tmp_path)
    with pytest.raises(InvalidOptionError, match="lr was 0.05, now 0.2"):
        train(_digits_model(), masks, (xtr, ytr), (xte, yte), TrainConfig(epochs=1, lr=0.2), out=tmp_path, resume=True)
    with pytest.raises(InvalidOptionError, match="'sparsity' argument of make_mask\\(\\) must be in \\[0, 1\\). Got 1.5."):
        make_mask(model, ["fc1.weight"], "random", 1.5)
    with pytest.raises(InvalidOptionError, match="'mask' argument of make_mask"):
        make_mask(model, ["fc1.weight"], "lottery", 0.5)
    with pytest.raises(InvalidOptionError, match="'scope'"):
        make_mask(model, ["fc1.weight"], "random", 0.5, scope="row")
    with pytest.raises(InvalidOptionError, match="'images' argument of mask_scores"):
        make_mask(model, ["fc1.weight"], "snip", 0.5)


# ----------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.5", "--mask", "random"], "argument --sparsity: must be a number in [0, 1). Got 1.5."),
    (["--mask", "random", "--sparsity", "0.5", "--recipe", "fancy"], "argument --recipe: invalid choice"),
    (["--mask", "random", "--sparsity", "0.5", "--epochs", "0"], "argument --epochs: must be an integer >= 1. Got 0."),
    (["--mask", "random", "--sparsity", "0.5", "--soft-activation", "gelu"], "argument --soft-activation: invalid choice"),
])
def test_cli_argument_rejections(argv, message, capsys, tmp_path):
    base = ["train", "--model", "mlpnet", "--out", str(tmp_path / "o")]
    if "--epochs" not in argv:
        base += ["--epochs", "1"]
    with pytest.raises(SystemExit) as info:
        main(base + argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_run(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoint.pt").write_bytes(b"")
    code = main(["train", "--model", "mlpnet", "--mask", "random", "--sparsity", "0.5", "--epochs", "1",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "The '--out' argument of cbs train holds a run (checkpoint.pt): pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--mask", "random"], "The '--sparsity' argument of cbs train must be given (in [0, 1)) with --mask random. Got none."),
    (["--mask", "nosuch.pt"], "The '--mask' argument of cbs train must be one of random, magnitude, snip, grasp, synflow"),
    (["--mask", "random", "--sparsity", "0.5", "--ghost-epochs", "5"],
     "The '--ghost-epochs' argument of cbs train must be an integer in [1, --epochs = 2]. Got 5."),
])
def test_cli_semantic_rejections(argv, message, capsys, tmp_path):
    code = main(["train", "--model", "mlpnet", "--epochs", "2", "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_cli_train_mlpnet_end_to_end(shared_data, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = ["train", "--model", "mlpnet", "--data-dir", str(shared_data), "--mask", "snip", "--sparsity", "0.9",
            "--recipe", "tost", "--no-rescale-init", "--epochs", "2", "--ghost-epochs", "1", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["finished"] and len(rec["history"]) == 2
    assert rec["recipe_techniques"] == ["ghost_skip", "ghost_neurons", "label_smoothing"]
    assert rec["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rec["parameter_count"] == 32360 and rec["final_accuracy"] > 80
    state = torch.load(out / "model.pt", weights_only=True)
    MLPNet().load_state_dict(state, strict=True)
    # the mask it wrote is accepted back as --mask FILE, fine-tuning the trained weights
    out2 = tmp_path / "again"
    assert main(["train", "--model", "mlpnet", "--data-dir", str(shared_data), "--mask", str(out / "mask.pt"),
                 "--recipe", "plain", "--epochs", "1", "--out", str(out2), "--no-progress", "--threads", "1"]) == 0
    rec2 = json.loads((out2 / "record.json").read_text())
    assert rec2["achieved_sparsity"] == pytest.approx(rec["achieved_sparsity"])
    assert "final accuracy" in capsys.readouterr().out
    assert main(argv[:-3] + ["--resume", "--no-progress"]) == 0  # finished: returns the record, no work
