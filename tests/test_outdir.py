"""cbs prune's output folder: checked before any work, one run at a time, replaced only when asked."""

from __future__ import annotations

import fcntl
import os

import pytest

from engine.cli import main
from engine.errors import InvalidOptionError
from engine.outdir import check_out, locked


def _prune(out, *extra):
    return ["prune", "--model", "mlpnet", "--sparsity", "0.5", "--method", "magnitude", "--out", str(out),
            "--no-progress", *extra]


def test_bad_out_paths_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("engine.userspec.load_model_spec", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "record.json").write_text("{}")
    cases = [("", "must name a folder"), (str(a_file), "which is a file"), (str(a_file / "sub"), "is a file"),
             ("/dev/null", "which is a file"), (str(full), "pass --overwrite")]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((str(ro / "out"), "this user can write"))
    for out, message in cases:
        assert main(_prune(out)) == 2, out
        err = capsys.readouterr().err
        assert "'--out'" in err and message in err and len(err.strip().splitlines()) == 1, err
    assert (full / "record.json").read_text() == "{}"


def test_overwrite_replaces_a_full_folder_and_leftovers_are_cleaned(tmp_path, shared_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    leftover = tmp_path / ".run.new-abc"
    leftover.mkdir()
    assert main(_prune(out, "--data-dir", str(shared_data), "--overwrite")) == 0
    # checkpoint.pt: the finished run's small marker (cbs prune --resume returns its record, engine/resume.py)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "mask.pt", "model.pt", "record.json"]
    assert not leftover.exists()


def test_a_second_run_into_a_held_folder_stops_at_once(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # another run holds it

        def no_work(*args, **kwargs):
            raise AssertionError("worked on a folder another run holds")

        monkeypatch.setattr("engine.userspec.load_model_spec", no_work)
        assert main(_prune(out)) == 2
    assert "is in use by another run" in capsys.readouterr().err and not out.exists()


def test_check_out_and_locked_directly(tmp_path):
    out = check_out(tmp_path / "a" / "b", "test")
    assert out.parent.is_dir() and not out.exists()
    with locked(out, "test"):
        with locked(out, "test"):  # the same run (the CLI, then the API it calls) nests
            pass
        with open(tmp_path / "a" / ".b.lock", "a+") as fh:  # another holder cannot take it meanwhile
            with pytest.raises(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "a" / ".b.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(InvalidOptionError, match="in use by another run"):
            with locked(out, "test"):
                pass
    with locked(out, "test"):  # released after the block
        pass


def test_disk_full_is_one_line_exit_1_and_the_old_folder_stays(tmp_path, shared_data, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    out.mkdir()
    (out / "record.json").write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("engine.records.os.fsync", full)
    assert main(_prune(out, "--data-dir", str(shared_data), "--overwrite")) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.strip().splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left to write" in errors[0] and "MiB free" in errors[0]
    assert [p.name for p in out.iterdir()] == ["record.json"] and (out / "record.json").read_text() == "old"
    assert not list(tmp_path.glob(".run.new-*"))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("engine.userspec.load_model_spec", interrupted)
    assert main(_prune(tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"cbs prune: interrupted; {tmp_path / 'run'} holds what was complete before "
                                        "(outputs are written as a whole; a multi-stage or layer-wise run continues "
                                        "from its last stage or layer with --resume)"]


def test_an_unknown_solver_parameter_of_cbs_solve_lists_the_solver_parameters(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "p.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.normal(size=(8, 6)), w=rng.normal(size=6), lam=np.float64(0.1), k=np.int64(3))
    assert main(["solve", str(path), "--solver", "swap", "--param", "foo_bar=3"]) == 2
    err = capsys.readouterr().err
    assert "'foo_bar' parameter is not one of solver 'swap''s parameters" in err and len(err.strip().splitlines()) == 1


def test_an_integer_checkpoint_is_refused(tmp_path):
    import torch
    from torch import nn

    from engine.errors import CheckpointError
    from engine.models import load_checkpoint

    net = nn.Linear(3, 2)
    path = tmp_path / "int.pt"
    torch.save({k: (v * 100).to(torch.int64) for k, v in net.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="non-floating tensors.*weight \\(torch.int64, model torch.float32\\)"):
        load_checkpoint(nn.Linear(3, 2), path)


@pytest.mark.parametrize("content", [b"", b"not a zip archive at all", b"PK\x03\x04 truncated"])
def test_a_corrupt_cifar_file_is_one_error_naming_it(tmp_path, content):
    from engine.data import load_cifar10
    from engine.errors import CBSError

    (tmp_path / "cifar10").mkdir()
    bad = tmp_path / "cifar10" / "cifar10_test.npz"
    bad.write_bytes(content)
    with pytest.raises(CBSError, match="cifar10_test.npz"):
        load_cifar10(tmp_path, "test")


def test_cbs_solve_names_the_solver_flag(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "p.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.normal(size=(8, 6)), w=rng.normal(size=6), lam=np.float64(0.1), k=np.int64(3))
    assert main(["solve", str(path), "--solver", "nope"]) == 2
    err = capsys.readouterr().err
    assert "The '--solver' argument must be one of" in err and "'method'" not in err
