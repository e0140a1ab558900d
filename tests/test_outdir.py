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
    assert sorted(p.name for p in out.iterdir()) == ["mask.pt", "model.pt", "record.json"]
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
        with pytest.raises(InvalidOptionError, match="in use by another run"):
            with locked(out, "test"):
                pass
    with locked(out, "test"):  # released after the block
        pass
