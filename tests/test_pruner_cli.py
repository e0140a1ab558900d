"""The pruner end to end on the embedded digits, its all-or-nothing edit, and the CLI's error paths."""

import copy
import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import load_digits
from engine.demo import train_small_mlp
from engine.errors import InvalidOptionError, SolverError
from engine.models import prunable_parameters
from engine.pruner import PruneConfig, check_prune_inputs, prune
from engine.result import SolveResult
from engine.solvers.base import Capabilities, SubsetSolver
from formulations.objective import optimal_update


@pytest.fixture(scope="module")
def trained():
    model, _ = train_small_mlp(epochs=60, seed=0)
    x, y = load_digits("train")
    return model, x, y


@pytest.mark.parametrize("mode", ["layer", "whole", "row"])
@pytest.mark.parametrize("update", [False, True])
def test_prune_masks_budget_and_update(trained, mode, update):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = [n for n, _ in prunable_parameters(model)]
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = PruneConfig(sparsity=0.7, method="magnitude", update=update, fisher_samples=300, block_mode=mode, seed=1,
                         certify=True)
    report = prune(model, names, (x, y), config)
    n_total = sum(dense[n].numel() for n in names)
    assert report.n_total == n_total
    assert report.n_keep == round(0.3 * n_total)
    for r, b in zip(report.results, report.blocks):
        assert b.bound is not None and b.bound <= b.objective + 1e-9 and b.gap >= 0
        assert int(r.support.sum()) == b.k
    # the mask is applied and pruned weights are exactly zero
    state = dict(model.named_buffers())
    for n in names:
        mask = state[n.replace(".weight", ".weight_mask")].bool()
        w = model.get_submodule(n.rsplit(".", 1)[0]).weight
        assert torch.all(w[~mask] == 0)
        if not update:  # kept weights untouched
            assert torch.equal(w[mask], dense[n][mask])
    if update and mode == "whole":  # the written weights equal the numpy reference update
        (r,) = report.results
        ref = optimal_update(report_problem(base, names, x, y, config, r.support.sum()), r.support)
        got = torch.cat([model.get_submodule(n.rsplit(".", 1)[0]).weight.detach().reshape(-1) for n in names])
        np.testing.assert_allclose(got.double().numpy(), ref.weights, rtol=1e-4, atol=1e-6)


def test_magnitude_without_update_computes_no_gradients_unless_certified(trained, monkeypatch):
    """Plain magnitude masking reads nothing but the weights: no gradient rows, no objective in the record;
    the same masks as the certified run, which does compute them for its bounds."""
    base, x, y = trained
    names = [n for n, _ in prunable_parameters(base)]
    certified = copy.deepcopy(base)
    ref = prune(certified, names, (x, y), PruneConfig(sparsity=0.7, method="magnitude", fisher_samples=300, certify=True))
    assert all(b.bound is not None for b in ref.blocks)

    def no_gradients(*args, **kwargs):
        raise AssertionError("gradients computed for plain magnitude masking")

    monkeypatch.setattr("engine.stage.per_sample_gradients", no_gradients)
    plain = copy.deepcopy(base)
    report = prune(plain, names, (x, y), PruneConfig(sparsity=0.7, method="magnitude", fisher_samples=300))
    assert all(b.objective is None and b.bound is None for b in report.blocks)
    assert report.to_dict()["objective_total"] is None and report.config["certify"] is False
    for n in names:
        assert torch.equal(report.masks[n], ref.masks[n])


def report_problem(model, names, x, y, config, k):
    """Rebuild the whole-network block problem the pruner solved (same draw, same gradients)."""
    from engine.fisher import per_sample_gradients
    from formulations.problem import BlockProblem

    gen = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(x.shape[0], generator=gen)[: config.fisher_samples]
    gs = per_sample_gradients(model, names, x[idx], y[idx])
    X = gs.matrix().double().numpy() / np.sqrt(gs.n_rows)
    w = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names]).double().numpy()
    return BlockProblem(w, int(k), config.damping, factor=X)


class _WrongSize(SubsetSolver):
    name = "wrong_size"
    capabilities = Capabilities()

    def __init__(self):
        self.calls = 0

    def solve(self, problem, options, warm_start=None):
        self.calls += 1
        support = np.zeros(problem.n, dtype=bool)
        support[: problem.n_keep] = True
        if self.calls == 2:  # the second block breaks the contract
            support[:] = True
        return SolveResult(support=support)


def test_prune_failure_leaves_model_untouched(trained):
    base, x, y = trained
    model = copy.deepcopy(base)
    names = [n for n, _ in prunable_parameters(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SolverError, match="support of size"):
        prune(model, names, (x, y), PruneConfig(sparsity=0.5, method=_WrongSize(), fisher_samples=50))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"sparsity": 1.0}, r"'sparsity' argument of prune\(\) must be a number in \[0, 1\). Got 1.0"),
        ({"sparsity": -0.1}, r"'sparsity'.*Got -0.1"),
        ({"sparsity": 0.5, "fisher_samples": 0}, r"'fisher_samples'.*>= 1. Got 0"),
        ({"sparsity": 0.5, "fisher_batch": 0}, r"'fisher_batch'"),
        ({"sparsity": 0.5, "damping": -1.0}, r"'damping'.*> 0. Got -1.0"),
        ({"sparsity": 0.5, "damping": 0.0}, r"'damping'"),
        ({"sparsity": 0.5, "block_mode": "chunk"}, r"'block_size'"),
        ({"sparsity": 0.5, "block_mode": "tiles"}, r"'block_mode'"),
        ({"sparsity": 0.5, "allocation": "random"}, r"'allocation'"),
        ({"sparsity": 0.5, "seed": -1}, r"'seed'"),
        ({"sparsity": 0.5, "time_limit": 0}, r"'time_limit'"),
    ],
)
def test_prune_config_rejections(kwargs, pattern):
    with pytest.raises(InvalidOptionError, match=pattern):
        PruneConfig(**kwargs)


def test_prune_rejects_unknown_method_and_too_many_samples(trained):
    base, x, y = trained
    names = [n for n, _ in prunable_parameters(base)]
    with pytest.raises(InvalidOptionError, match="'method'.*magnitude"):
        prune(copy.deepcopy(base), names, (x, y), PruneConfig(sparsity=0.5, method="nope"))
    with pytest.raises(InvalidOptionError, match="'fisher_samples'"):
        prune(copy.deepcopy(base), names, (x, y), PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=10**6))


def test_prune_rejects_a_block_too_large_for_the_method_before_any_gradient(trained, monkeypatch):
    base, x, y = trained
    names = [n for n, _ in prunable_parameters(base)]

    def no_work(*args, **kwargs):
        raise AssertionError("gradients computed before the block-size check")

    monkeypatch.setattr("engine.stage.per_sample_gradients", no_work)
    with pytest.raises(InvalidOptionError, match="at most 24 weights.*--block-size"):
        prune(copy.deepcopy(base), names, (x, y), PruneConfig(sparsity=0.5, method="brute_force", block_mode="layer"))


@pytest.mark.parametrize("change, pattern", [
    (dict(config="not a config"), r"'config'.*PruneConfig"),
    (dict(names=[]), r"'parameter_names'"),
    (dict(names=["nope.weight"]), r"'parameter_names'.*nope.weight"),
    (dict(n_train=0), r"'n_train'.*integer >= 1.*Got 0"),
    (dict(n_train=True), r"'n_train'"),
    (dict(n_train=99), r"'fisher_samples'.*at most the 99.*100 x 1 = 100"),
    (dict(config=PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=10, loss_samples=200)),
     r"'loss_samples'.*at most the 150 training samples.*Got 200"),
    (dict(config=PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=100, loss_samples=60,
                             holdout_loss=True)), r"'loss_samples'.*at most the 50 training samples left"),
    (dict(config=PruneConfig(sparsity=0.5, method="nope")), r"'method'"),
])
def test_check_prune_inputs_rejections(trained, change, pattern):
    """Each of check_prune_inputs' rejections names its argument (150 training samples by default)."""
    base, _, _ = trained
    names = change.get("names", [n for n, _ in prunable_parameters(base)])
    config = change.get("config", PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=100))
    with pytest.raises(InvalidOptionError, match=pattern):
        check_prune_inputs(base, names, change.get("n_train", 150), config)


def test_check_prune_inputs_accepts_what_fits_and_returns_the_solver(trained):
    base, _, _ = trained
    names = [n for n, _ in prunable_parameters(base)]
    config = PruneConfig(sparsity=0.5, method="magnitude", fisher_samples=100, loss_samples=50, holdout_loss=True)
    assert check_prune_inputs(base, names, 150, config).name == "magnitude"


# ----------------------------------------------------------------------------------------- CLI
def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits 2 on its own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "mlpnet", "--sparsity", "1.5"], r"--sparsity: must be a number in \[0, 1\). Got 1.5"),
        (["--model", "mlpnet", "--sparsity", "nan"], r"--sparsity: must be a number in \[0, 1\)"),
        (["--model", "vgg", "--sparsity", "0.5"], r"'--model'.*FILE.py:FUNC.*Got 'vgg'"),
        (["--model", "mlpnet", "--sparsity", "0.5", "--fisher-samples", "0"], r"--fisher-samples: must be an integer >= 1. Got 0"),
        (["--model", "mlpnet", "--sparsity", "0.5", "--damping", "-1"], r"--damping: must be a number > 0. Got -1"),
        (["--model", "mlpnet", "--sparsity", "0.5", "--checkpoint", "/no/such.ckpt"], r"'--checkpoint'.*'/no/such.ckpt' does not exist"),
        (["--model", "mlpnet", "--sparsity", "0.5", "--data-dir", "/no/such/dir"], r"data folder /no/such/dir does not exist"),
        (["--model", "mlpnet", "--sparsity", "0.5", "--block-size", "0"], r"--block-size: must be an integer >= 1"),
    ],
)
def test_cli_prune_bad_arguments_exit_2(argv, pattern, capsys, tmp_path):
    code, _, err = _run(["prune", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert __import__("re").search(pattern, err), err


def test_cli_unknown_method_exit_2(capsys, tmp_path, shared_data):
    code, _, err = _run(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "nope",
                         "--data-dir", str(shared_data), "--out", str(tmp_path)], capsys)
    assert code == 2 and "'method' argument must be one of" in err and "Got 'nope'" in err


def test_cli_checkpoint_mismatch_exit_2(capsys, tmp_path, shared_data):
    code, _, err = _run(["prune", "--model", "resnet20", "--sparsity", "0.5", "--data-dir", str(shared_data),
                         "--checkpoint", str(shared_data / "weights/woodfisher_mlpnet_mnist.npz"),
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and "resnet20" in err.lower() and not (tmp_path / "record.json").exists()


def test_cli_missing_data_in_data_dir_exit_2(capsys, tmp_path, shared_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--data-dir", str(empty),
                         "--checkpoint", str(shared_data / "weights/woodfisher_mlpnet_mnist.npz"),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "mnist" in err.lower()


def test_cli_samples_beyond_the_training_set_exit_2_before_any_work(capsys, tmp_path, shared_data, monkeypatch):
    """The ResNet20 recommendation holds 1,000 loss images out of the Fisher draw: 3,100 rows of 16 images
    leave too few of the 50,000. The check runs right after the data is loaded, before the dense model
    is evaluated."""
    def no_work(*args, **kwargs):
        raise AssertionError("evaluated before the sample-count check")

    monkeypatch.setattr("engine.pipeline.evaluate_samples", no_work)
    code, _, err = _run(["prune", "--model", "resnet20", "--sparsity", "0.8", "--data-dir", str(shared_data),
                         "--fisher-samples", "3100", "--out", str(tmp_path)], capsys)
    assert code == 2 and "'loss_samples'" in err and "400 training samples left after the 49600" in err, err
    assert not (tmp_path / "record.json").exists()


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("10", 10), ("true", True), ("True", True), ("null", None), ("None", None),
    ('"whole"', "whole"), ("'whole'", "whole"), ("obs", "obs"), ("[1, 2]", [1, 2]), ("{'a': 1}", {"a": 1}),
    ("", ""), ("a b", "a b"),
])
def test_key_value_flags_read_json_python_literals_and_bare_words(text, value):
    """cbs prune --param and reproduce.py --set read values the same way."""
    from engine.cli import parse_value

    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_cli_bad_solver_param_exit_2(capsys, tmp_path, shared_data):
    code, _, err = _run(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--data-dir", str(shared_data),
                         "--param", "oops", "--out", str(tmp_path)], capsys)
    assert code == 2 and "NAME=VALUE" in err


def test_cli_prune_mlpnet_end_to_end(capsys, tmp_path, shared_data):
    code, out, err = _run(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "magnitude",
                           "--fisher-samples", "64", "--data-dir", str(shared_data), "--no-progress",
                           "--param", "certify=true", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "record.json").read_text())
    for key in ("model", "method", "update", "sparsity", "achieved_sparsity", "dense_accuracy", "accuracy",
                "test_loss", "prune_seconds", "fisher_seconds", "seed", "environment", "blocks"):
        assert key in rec
    assert abs(rec["dense_accuracy"] - 93.97) < 0.01
    assert abs(rec["achieved_sparsity"] - 0.5) < 1e-4
    assert all(set(b) >= {"n", "k", "objective", "bound", "gap"} for b in rec["blocks"])
    # every block's certificate says where its bound came from, what it cost, and the residual bound it beat
    for b in rec["blocks"]:
        assert b["extra"]["certificate_from"] in ("residual", "trivial", "relaxation", "bnb")
        assert b["extra"]["certificate_seconds"] >= 0 and b["bound"] >= b["extra"]["residual_bound"] - 1e-12
        assert 0 <= b["gap"] <= 1  # g = 0: the trivial bound caps it at 100 %
    assert rec["environment"]["versions"]["torch"]
    assert "record:" in out


def test_cli_solvers_lists_builtins(capsys):
    code, out, _ = _run(["solvers", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["magnitude"]["available"] and not rows["magnitude"]["exact"]
    assert rows["swap"]["patterns"] and rows["brute_force"]["patterns"] and not rows["greedy"]["patterns"]


def test_cli_demo_writes_table_records_and_plot(capsys, tmp_path):
    code, out, err = _run(["demo", "--out", str(tmp_path), "--sparsities", "0.5", "0.8",
                           "--methods", "magnitude", "recommended", "--epochs", "60"], capsys)
    assert code == 0, err
    assert "| magnitude |" in out and "| recommended |" in out and "--stages" in out
    for name in ("table.md", "records.jsonl", "record.json", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(abs(r["achieved_sparsity"] - r["sparsity"]) < 1e-3 for r in rows)
    # exact against heuristic: a proven optimum, every heuristic at or above it, its certificate never below
    gaps = json.loads((tmp_path / "record.json").read_text())["exact_vs_heuristic"]
    assert gaps and all(g["proven"] for g in gaps)
    for g in gaps:
        for m in ("magnitude", "woodfisher", "greedy", "swap"):
            assert g[m]["objective"] >= g["optimum"] * (1 - 1e-9)
            assert g[m]["certified_gap"] >= g[m]["true_gap"] - 1e-9
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_demo_rejects_unknown_method(capsys, tmp_path):
    code, _, err = _run(["demo", "--out", str(tmp_path), "--methods", "nope"], capsys)
    assert code == 2 and "'methods'" in err and "nope" in err


def _saved_problem(tmp_path, **overrides):
    rng = np.random.default_rng(3)
    arrays = {"X": rng.normal(size=(16, 8)), "w": rng.normal(size=8), "lam": np.float64(0.1), "k": np.int64(4)}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    return path


def test_cli_solve_json_matches_the_objective(capsys, tmp_path):
    from engine.problem_io import load_problem
    from formulations.objective import support_objective

    path = _saved_problem(tmp_path)
    code, out, err = _run(["solve", str(path), "--solver", "brute_force", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    for key in ("objective", "bound", "gap", "status", "termination", "wall_time", "support"):
        assert key in res
    p = load_problem(path)
    assert res["status"] == "optimal" and res["gap"] == 0
    assert res["objective"] == pytest.approx(support_objective(p, np.array(res["support"])), rel=1e-12)
    code, out, _ = _run(["solve", str(path), "--solver", "magnitude"], capsys)
    assert code == 0 and "objective" in out and "kept (4 of 8)" in out


@pytest.mark.parametrize("overrides, pattern", [
    ({"lam": None}, "Missing: lam"),
    ({"k": np.int64(9)}, r"'n_keep'.*\[0, 8\]"),
    ({"lam": np.float64(-1.0)}, "'damping'"),
    ({"k": np.float64(2.5)}, "'k' entry"),
    ({"w": np.ones(7)}, "'factor'"),
])
def test_cli_solve_bad_problem_files_exit_2(overrides, pattern, capsys, tmp_path):
    code, _, err = _run(["solve", str(_saved_problem(tmp_path, **overrides))], capsys)
    assert code == 2 and __import__("re").search(pattern, err), err


def test_cli_solve_rejects_missing_file_and_unknown_solver(capsys, tmp_path):
    code, _, err = _run(["solve", str(tmp_path / "none.npz")], capsys)
    assert code == 2 and "existing file" in err
    code, _, err = _run(["solve", str(_saved_problem(tmp_path)), "--solver", "nope"], capsys)
    assert code == 2 and "Got 'nope'" in err


def test_cli_export_blocks_real_rows(capsys, tmp_path, shared_data):
    from engine.problem_io import load_problem

    code, out, err = _run(["export-blocks", "--model", "mlpnet", "--data-dir", str(shared_data), "--params",
                           "fc3.weight", "--fisher-samples", "30", "--max-blocks", "3", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "index.json").read_text())
    assert [b["n"] for b in index["blocks"]] == [20, 20, 20] and all(b["k"] == 10 for b in index["blocks"])
    p = load_problem(tmp_path / index["blocks"][0]["file"])
    assert p.n == 20 and p.n_samples == 30 and p.damping == 1e-3


def test_cli_solve_gap_is_a_fraction_in_json_and_a_percentage_in_text(capsys, tmp_path):
    path = _saved_problem(tmp_path)
    code, out, err = _run(["solve", str(path), "--solver", "magnitude", "--certify-time", "0", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["gap"] == pytest.approx((res["objective"] - res["bound"]) / abs(res["objective"]), rel=1e-12, abs=1e-15)
    assert 0 <= res["gap"] <= 1  # no gradient: the trivial bound 0 caps it at 100 %
    code, text, _ = _run(["solve", str(path), "--solver", "magnitude", "--certify-time", "0"], capsys)
    assert code == 0 and f"gap {100 * res['gap']:.4g} %" in text


@pytest.mark.parametrize("bad", ["-1", "nan", "x"])
def test_cli_solve_bad_certify_time_exits_2(bad, capsys, tmp_path):
    code, _, err = _run(["solve", str(_saved_problem(tmp_path)), "--certify-time", bad], capsys)
    assert code == 2 and "--certify-time" in err, err
