"""Issue 20's reliability cases for cbs train, demo, export-blocks and solve, and for the data loaders: results are
never mixed or lost, bad input is one line and exit 2 before any work, and a resumed run is the run it resumes."""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import re

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.errors import CBSError

TRAIN = ["train", "--model", "mlpnet", "--mask", "random", "--sparsity", "0.9", "--epochs", "2", "--no-progress",
         "--threads", "1"]


def _train(out, data, *extra):
    return [*TRAIN, "--data-dir", str(data), "--out", str(out), *extra]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("cbs ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_resume_checks_what_it_resumes_and_the_folder_is_one_epoch(tmp_path, shared_data, capsys,
                                                                          monkeypatch):
    import engine.training as training

    out = tmp_path / "run"
    calls = {"n": 0}
    real = training.evaluate

    def killed_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", killed_in_epoch_2)
    assert main(_train(out, shared_data)) == 130
    assert "holds the last complete epoch" in _one_error(capsys)
    monkeypatch.setattr(training, "evaluate", real)
    # the folder is epoch 1's, as a whole: record, checkpoint and mask agree; no model yet
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "mask.pt", "record.json"]
    record = json.loads((out / "record.json").read_text())
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    mask = torch.load(out / "mask.pt", weights_only=True)
    assert record["epochs_done"] == state["epoch"] == 1 and not record["finished"]
    assert all(torch.equal(mask[k], state["masks"][k]) for k in mask)

    # a different setting that shapes the result is refused, naming it; the folder is untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, named in ((["--sparsity", "0.5"], "sparsity was 0.9, now 0.5"),
                         (["--mask", "magnitude"], "mask_source was 'random', now 'magnitude'"),
                         (["--seed", "1"], "seed was 0, now 1"),
                         (["--scope", "layerwise"], "scope was 'global', now 'layerwise'")):
        assert main([*_train(out, shared_data), *extra, "--resume"]) == 2, extra
        line = _one_error(capsys)
        assert named in line and "Cannot resume the run in" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # the same settings continue it: two epochs, the kept mask, no weight alive where the mask is 0
    assert main([*_train(out, shared_data), "--resume"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["finished"] and [h["epoch"] for h in record["history"]] == [1, 2]
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(int((model[k][~m] != 0).sum()) == 0 for k, m in mask.items())
    capsys.readouterr()

    # a finished training folder: cbs prune, a new train and a train --resume --overwrite are refused
    assert main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "magnitude", "--out", str(out),
                 "--no-progress"]) == 2
    assert "pass --overwrite" in _one_error(capsys)
    assert main(_train(out, shared_data)) == 2
    assert "holds a run (checkpoint.pt): pass --resume" in _one_error(capsys)
    assert main([*_train(out, shared_data), "--resume", "--overwrite"]) == 2
    assert "not both" in _one_error(capsys)
    # --overwrite replaces it as a whole
    assert main([*_train(out, shared_data), "--epochs", "1", "--overwrite"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["finished"] and len(record["history"]) == 1


def test_train_resume_into_a_folder_that_is_not_a_training_run_is_refused(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("worked before --out was checked")

    monkeypatch.setattr("engine.data.dataset_for_model", no_work)
    prune_folder = tmp_path / "pruned"
    prune_folder.mkdir()
    (prune_folder / "record.json").write_text("{}")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [([*TRAIN, "--out", str(prune_folder), "--resume"], "must hold a run of cbs train to resume"),
             ([*TRAIN, "--out", ""], "must name a folder"),
             ([*TRAIN, "--out", str(a_file)], "which is a file"),
             ([*TRAIN, "--out", str(a_file / "x")], "is a file")]
    for argv, message in cases:
        assert main(argv) == 2
        line = _one_error(capsys)
        assert "'--out' argument of cbs train" in line and message in line, line
    assert (prune_folder / "record.json").read_text() == "{}"


def test_one_train_per_folder(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("worked on a folder another run holds")

    monkeypatch.setattr("engine.data.dataset_for_model", no_work)
    with open(tmp_path / ".run.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 2
    assert "is in use by another run" in _one_error(capsys)


def test_a_full_disk_during_training_keeps_the_last_epoch(tmp_path, shared_data, capsys, monkeypatch):
    import errno

    import engine.records as records

    out = tmp_path / "run"
    real = records.os.fsync
    calls = {"n": 0}

    def full_in_epoch_2(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # epoch 1 writes three files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(records.os, "fsync", full_in_epoch_2)
    assert main(_train(out, shared_data)) == 1
    line = _one_error(capsys)
    assert "No space left to write" in line and "MiB free" in line
    assert json.loads((out / "record.json").read_text())["epochs_done"] == 1
    assert not list(tmp_path.glob(".run.new-*"))


def test_mask_files_that_prune_everything_are_refused_and_an_empty_layer_warns(tmp_path, shared_data, capsys,
                                                                               caplog):
    from engine.models import MLPNet

    shapes = {k: v.shape for k, v in MLPNet().state_dict().items() if k.endswith("weight")}
    zeros = tmp_path / "zeros.pt"
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, zeros)
    assert main([*TRAIN[:4], str(zeros), "--epochs", "1", "--data-dir", str(shared_data), "--out",
                 str(tmp_path / "a")]) == 2
    assert "prunes every weight it covers (sparsity 1)" in _one_error(capsys)
    one_layer = tmp_path / "one_layer.pt"
    first = next(iter(shapes))
    torch.save({k: (torch.zeros(s) if k == first else torch.ones(s)) for k, s in shapes.items()}, one_layer)
    from engine.sparse_masks import load_mask_file
    from engine.training import TrainConfig, train

    masks = load_mask_file(one_layer, MLPNet())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with caplog.at_level(logging.WARNING, logger="cbs.training"):
        train(MLPNet(), masks, (x, y), (x, y), TrainConfig(epochs=1, batch_size=8))
    assert f"the mask prunes every weight of {first}" in caplog.text


def test_mask_samples_larger_than_the_data_is_an_error(tmp_path, shared_data, capsys):
    assert main([*TRAIN[:4], "snip", "--sparsity", "0.5", "--epochs", "1", "--data-dir", str(shared_data),
                 "--mask-samples", "60001", "--out", str(tmp_path / "a")]) == 2
    line = _one_error(capsys)
    assert "'--mask-samples' argument of cbs train must be an integer in [1, 60000]" in line and "60001" in line
    assert not (tmp_path / "a").exists()


def _idx_labels(values: np.ndarray) -> bytes:
    return gzip.compress((2049).to_bytes(4, "big") + len(values).to_bytes(4, "big") + values.astype(np.uint8).tobytes())


def test_out_of_range_labels_are_refused_at_load_naming_file_index_and_value(tmp_path, shared_data):
    from engine.data import load_cifar10, load_mnist

    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for f in (shared_data / "mnist").iterdir():
        (mnist / f.name).symlink_to(f)
    labels = tmp_path / "labels.gz"
    raw = gzip.decompress((shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    values = np.frombuffer(raw, np.uint8, offset=8).copy()
    values[17] = 200
    labels.write_bytes(_idx_labels(values))
    (mnist / "t10k-labels-idx1-ubyte.gz").unlink()
    (mnist / "t10k-labels-idx1-ubyte.gz").symlink_to(labels)
    with pytest.raises(CBSError, match=r"t10k-labels-idx1-ubyte.gz' must be class indices in \[0, 9\]\. Got 200 at "
                                       r"index 17"):
        load_mnist(tmp_path, "test")

    (tmp_path / "cifar10").mkdir()
    with np.load(shared_data / "cifar10" / "cifar10_test.npz") as archive:
        data, labels = archive["data"][:50], archive["labels"][:50].copy()
    labels[3] = 42
    np.savez(tmp_path / "cifar10" / "cifar10_test.npz", data=data, labels=labels)
    with pytest.raises(CBSError, match=r"cifar10_test.npz' must be class indices in \[0, 9\]\. Got 42 at index 3"):
        load_cifar10(tmp_path, "test")


def test_user_tensor_targets_are_all_checked_before_the_work(tmp_path):
    from torch import nn

    from engine.errors import InvalidOptionError
    from engine.losses import cross_entropy, top1_accuracy
    from engine.sources import Samples
    from engine.userspec import UserModel, check_data_against_model

    x, y = torch.randn(20, 4), torch.zeros(20, dtype=torch.long)
    y[13] = 7
    user = UserModel(nn.Linear(4, 3), "test", "function")
    with pytest.raises(InvalidOptionError, match=r"Got 7 at index 13.*The model has 3 outputs"):
        check_data_against_model(user, Samples((x, y)), cross_entropy, top1_accuracy)


@pytest.mark.parametrize("name,arrays,message", [
    ("lam_array", {"lam": np.array([1e-3, 1e-3])}, "'lam' entry of .* must be a scalar"),
    ("x_text", {"X": np.full((6, 4), "a")}, "'X' entry of .* real numbers. Got dtype <U1 \\(text\\)"),
    ("x_objects", {"X": np.array([[1, 2], [3]], dtype=object)}, "'X' entry .* Python objects"),
    ("x_complex", {"X": np.ones((6, 4)) + 1j}, "'X' entry .* complex128 \\(complex numbers\\)"),
    ("w_bool", {"w": np.ones(4, dtype=bool)}, "'w' entry .* bool \\(booleans\\)"),
])
def test_malformed_problem_files_are_one_line_exit_2(name, arrays, message, tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = {"X": rng.normal(size=(6, 4)), "w": rng.normal(size=4), "lam": np.float64(1e-3), "k": np.int64(2)}
    path = tmp_path / f"{name}.npz"
    np.savez(path, **{**base, **arrays})
    assert main(["solve", str(path), "--solver", "greedy"]) == 2
    line = _one_error(capsys)
    assert re.search(message, line), line


def test_empty_and_text_problem_files(tmp_path, capsys):
    empty, text = tmp_path / "empty.npz", tmp_path / "text.npz"
    empty.write_bytes(b"")
    text.write_text("X,w\n1,2\n")
    assert main(["solve", str(empty)]) == 2
    assert "is empty" in _one_error(capsys)
    assert main(["solve", str(text)]) == 2
    line = _one_error(capsys)
    assert "is not a .npz archive" in line and "pickled" not in line


def test_messages_carry_no_terminal_escape_codes(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse's own checks exit 2
        main(["solve", str(tmp_path / "\x1b[31mred.npz")])
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[31mred.npz" in err
    with pytest.raises(SystemExit):
        main(["prune", "--model", "mlpnet", "--sparsity", "\x1b[1m0.5", "--out", str(tmp_path / "o")])
    assert "\x1b" not in capsys.readouterr().err


def test_the_recommendation_line_shows_the_users_settings():
    from engine.data import load_digits
    from engine.demo import train_small_mlp
    from engine.pipeline import prepare

    model, _ = train_small_mlp(epochs=2)
    run = prepare(model, tuple(load_digits("train")), sparsity=0.5,
                  settings={"method": "greedy", "damping": 0.01, "seed": 4, "time_limit": 5.0, "certify": True})
    assert "--method greedy" in run.chosen and "--damping 0.01" in run.chosen
    assert "--seed 4" in run.chosen and "--time-limit 5.0" in run.chosen and "--param certify=True" in run.chosen


def test_demo_and_export_write_their_folder_as_a_whole(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["demo", "--out", str(out), "--sparsities", "0.5", "--methods", "magnitude", "--epochs", "5"]
    assert main(argv) == 2
    assert "pass --overwrite" in _one_error(capsys)
    (out / "notes.txt").unlink()
    assert main(argv) == 0
    first = {p.name for p in out.iterdir()}
    assert {"table.md", "records.jsonl", "record.json"} <= first
    import engine.demo as demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(demo, "exact_vs_heuristic", interrupted)
    assert main(argv) == 130  # a previous demo's folder may be replaced, but only as a whole
    assert "interrupted" in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".demo.new-*"))
    full = tmp_path / "blocks"
    full.mkdir()
    (full / "a.npz").write_bytes(b"")
    assert main(["export-blocks", "--model", "mlpnet", "--out", str(full)]) == 2
    assert "pass --overwrite" in _one_error(capsys)


def test_a_warning_is_one_line_without_source(tmp_path, capsys, monkeypatch):
    import warnings

    from engine.problem_io import save_problem
    from engine.solvers import registry
    from engine.solvers.magnitude import MagnitudeSolver
    from formulations.problem import BlockProblem

    class Noisy(MagnitudeSolver):
        name = "noisy"

        def solve(self, problem, options, warm_start=None):
            warnings.warn("something to know\non two lines", UserWarning)
            return super().solve(problem, options, warm_start)

    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    registry.register_solver("noisy")(Noisy)
    rng = np.random.default_rng(0)
    save_problem(tmp_path / "p.npz", BlockProblem(rng.normal(size=6), 3, 0.1, factor=rng.normal(size=(8, 6))))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["solve", str(tmp_path / "p.npz"), "--solver", "noisy"]) == 0
    err = capsys.readouterr().err
    assert err == "cbs solve: warning: something to know\\non two lines\n", err


def test_cbs_solve_json_with_highs_is_clean_json(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from engine.problem_io import save_problem
    from formulations.problem import BlockProblem

    rng = np.random.default_rng(0)
    save_problem(tmp_path / "p.npz", BlockProblem(rng.normal(size=10), 5, 0.1, factor=rng.normal(size=(12, 10))))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "engine.cli", "solve", str(tmp_path / "p.npz"), "--solver", "highs",
                           "--json"], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["solver"] == "highs"  # HiGHS's banner used to come first on stdout
