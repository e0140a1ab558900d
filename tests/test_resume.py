"""Resumable ``cbs prune`` runs (engine/resume.py): a run interrupted after a stage or a layer and resumed gives
the uninterrupted run's files bit for bit; a changed run, a foreign folder and a damaged checkpoint are refused.

Real runs on the digits shipped inside the package (no shared data): a small BatchNorm MLP pruned in three Fisher
stages (BatchNorm re-estimated between them) and the example MLP pruned layer-wise. The interruption is a
KeyboardInterrupt raised around the checkpoint write, where Ctrl-C would land.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.resume as resume
from engine.cli import main
from engine.errors import CheckpointError, InvalidOptionError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples"
BN_MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from engine.data import load_digits

def model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 10))

def data():
    train, test = load_digits("train"), load_digits("test")
    return TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels)
'''
#: --certify-time 0: a certificate tightened within a share of the solve time differs from run to run, resumed or not
FAST = ["--no-progress", "--threads", "1", "--certify-time", "0"]
#: record entries that measure time, memory or the machine: everything else must be equal
VOLATILE = ("seconds", "peak_memory_mb", "environment", "command", "wall_time", "overshoot")


@pytest.fixture(scope="module")
def bn_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "bn_mlp.py"
    path.write_text(BN_MODEL)
    return str(path)


def _fisher(spec, out, *extra):
    return ["prune", "--model", f"{spec}:model", "--data", f"{spec}:data", "--sparsity", "0.7", "--stages", "3",
            "--fisher-samples", "32", "--fisher-batch", "4", *FAST, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """The example's digits MLP, trained here (the repository holds no .pt file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_mlp_example", EXAMPLE / "digits_mlp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = tmp_path_factory.mktemp("digits") / "digits_mlp.pt"
    assert example.main(["--out", str(path), "--steps", "300"]) == 0
    return path


def _layerwise(out, checkpoint, *extra):
    spec = EXAMPLE / "digits_mlp.py"
    return ["prune", "--model", f"{spec}:model", "--data", f"{spec}:data", "--checkpoint",
            str(checkpoint), "--objective", "reconstruction", "--sparsity", "0.6",
            "--calibration-samples", "64", "--params", "0.weight,4.weight", *FAST, "--out", str(out), *extra]


def _interrupt_at(monkeypatch, call: int, before_writing: bool = False) -> None:
    """Ctrl-C at the ``call``-th checkpoint write: just after it (or just before it, so the stage or layer done
    last is lost and redone)."""
    real, calls = resume.Book.save, {"n": 0}

    def save(self, *args, **kwargs):
        calls["n"] += 1
        if before_writing and calls["n"] == call:
            raise KeyboardInterrupt
        real(self, *args, **kwargs)
        if calls["n"] == call:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.Book, "save", save)


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("mask.pt", "model.pt"):
        x, y = (torch.load(p / name, weights_only=True) for p in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    ra, rb = (json.loads((p / "record.json").read_text()) for p in (a, b))
    assert _stable(ra) == _stable(rb)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("cbs ")]
    assert "Traceback" not in err and lines, err
    return lines[-1]


@pytest.mark.parametrize("extra", [("--warm-start", "none"), ("--warm-start", "0.5")],
                         ids=["dense-start", "warm-start"])
def test_a_multistage_run_resumed_after_a_stage_is_the_uninterrupted_run(tmp_path, bn_spec, capsys, monkeypatch,
                                                                          extra):
    """With --warm-start 0.5 the exp schedule 0.331, 0.552, 0.7 becomes 0.5 (layer-wise), 0.552, 0.7: the cut
    falls after the layer-wise stage (a BatchNorm model at 0.7 would warm-start at 0.6 by default)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_fisher(bn_spec, whole, *extra)) == 0
    assert sorted(p.name for p in whole.iterdir()) == ["checkpoint.pt", "mask.pt", "model.pt", "record.json"]
    record = json.loads((whole / "record.json").read_text())
    assert len(record["stages"]) == 3 and "accuracy" in record["stages"][0] and record["bn_reestimate"]
    assert ("warm_start" in record["stages"][0]["extra"]) == (extra[1] != "none")

    with monkeypatch.context() as m:  # killed in stage 2's checkpoint: the folder is stage 1's, as a whole
        _interrupt_at(m, 2, before_writing=True)
        assert main(_fisher(bn_spec, cut, *extra)) == 130
    assert "continues from its last stage or layer with --resume" in _one_error(capsys)
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint.pt", "progress.json"]
    note = json.loads((cut / "progress.json").read_text())
    assert note["unit"] == "stage" and note["done"] == 1 and note["of"] == 3 and not note["finished"]

    assert main(_fisher(bn_spec, cut, *extra)) == 2  # without --resume: continue it or replace it, never mix
    assert "pass --resume" in _one_error(capsys)
    assert main(_fisher(bn_spec, cut, *extra, "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    _assert_same_run(whole, cut)


@pytest.mark.parametrize("extra", [("--method", "greedy"), ("--method", "greedy", "--no-sequential", "--allocation",
                                                             "loss_curve")], ids=["sequential", "dense-loss-curve"])
def test_a_layerwise_run_resumed_after_a_layer_is_the_uninterrupted_run(tmp_path, capsys, monkeypatch, extra,
                                                                       digits_checkpoint):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_layerwise(whole, digits_checkpoint, *extra)) == 0
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        assert main(_layerwise(cut, digits_checkpoint, *extra)) == 130
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert state["unit"] == "layer" and state["done"] == 1 and list(state["tensors"]["masks"]) == ["0.weight"]
    capsys.readouterr()
    assert main(_layerwise(cut, digits_checkpoint, *extra, "--resume")) == 0
    _assert_same_run(whole, cut)


def test_a_changed_run_is_refused_naming_each_difference(tmp_path, bn_spec, capsys, monkeypatch):
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        assert main(_fisher(bn_spec, out)) == 130
    from engine.userspec import load_function

    state = load_function(f"{bn_spec}:model", "model")().state_dict()
    state["0.weight"] = state["0.weight"] * 2  # other starting weights, same architecture
    other = tmp_path / "other.pt"
    torch.save(state, other)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, named in ((["--sparsity", "0.6"], "sparsity was 0.7, now 0.6"),
                         (["--method", "woodfisher"], "method was 'magnitude', now 'woodfisher'"),
                         (["--seed", "1"], "seed was 0, now 1"),
                         (["--checkpoint", str(other)], "the starting weights differ")):
        assert main(_fisher(bn_spec, out, "--resume", *extra)) == 2, extra  # the last --sparsity counts
        line = _one_error(capsys)
        assert "Cannot resume the run in" in line and named in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_only_execution_settings_may_change(tmp_path):
    from engine.data import load_digits
    from engine.pipeline import prepare

    data = load_digits("train")
    net = nn.Sequential(nn.Linear(64, 10))
    base = prepare(net, (data.images, data.labels), sparsity=0.5, settings={"method": "magnitude"})
    other = prepare(net, (data.images, data.labels), sparsity=0.5,
                    settings={"method": "magnitude", "workers": 2, "progress": False})
    assert resume.run_identity(base) == resume.run_identity(other)
    assert not set(resume.EXECUTION_ONLY) & set(resume.run_identity(base))
    changed = prepare(net, (data.images, data.labels), sparsity=0.6, settings={"method": "magnitude"})
    assert resume.run_identity(changed)["sparsity"] == 0.6


def test_resume_into_a_folder_that_is_not_a_prune_run_is_refused(tmp_path, bn_spec, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("worked before --out was checked")

    monkeypatch.setattr("engine.userspec.load_model_spec", no_work)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    trained = tmp_path / "trained"  # what cbs train leaves: its own checkpoint.pt
    trained.mkdir()
    torch.save({"epoch": 1, "config": {}}, trained / "checkpoint.pt")
    (trained / "record.json").write_text("{}")
    for folder, extra, message in ((notes, ["--resume"], "must hold a run of cbs prune to resume"),
                                   (trained, ["--resume"], "is another command's run; pass --overwrite"),
                                   (trained, [], "pass --overwrite to replace it"),
                                   (notes, ["--resume", "--overwrite"], "not both")):
        assert main(_fisher(bn_spec, folder, *extra)) == 2
        line = _one_error(capsys)
        assert "'--out' argument of cbs prune" in line and message in line, line
    assert (notes / "notes.txt").read_text() == "mine" and (trained / "record.json").read_text() == "{}"


def test_a_damaged_checkpoint_is_a_clear_checkpoint_error(tmp_path, bn_spec, capsys, monkeypatch):
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        assert main(_fisher(bn_spec, out)) == 130
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # cut short, as a full disk might leave it
    assert main(_fisher(bn_spec, out, "--resume")) == 2
    line = _one_error(capsys)
    assert f"The checkpoint '{out / 'checkpoint.pt'}' could not be read" in line and "--overwrite" in line, line
    with pytest.raises(CheckpointError, match="could not be read"):
        resume.read_checkpoint(out / "checkpoint.pt")


def test_resuming_a_finished_run_returns_its_record_without_work(tmp_path, bn_spec, capsys, monkeypatch):
    out = tmp_path / "one"
    argv = _fisher(bn_spec, out, "--method", "magnitude")  # one stage: no checkpoint on the way, a new folder
    assert main([*argv, "--resume"]) == 0
    first = (out / "record.json").read_bytes()
    capsys.readouterr()

    def no_work(*args, **kwargs):
        raise AssertionError("pruned again")

    with monkeypatch.context() as m:
        m.setattr("engine.pipeline.prune", no_work)
        assert main([*argv, "--resume"]) == 0
    assert "holds this run, finished: its record, no work" in capsys.readouterr().err
    assert (out / "record.json").read_bytes() == first

    from engine.api import prune_model
    from engine.masking import current_masks, make_permanent

    net, data = _digits_run()  # through the API: a finished run's result goes into the model, without work
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    folder, settings = tmp_path / "api", dict(sparsity=0.5, method="magnitude", update=True, stages=2,
                                              fisher_samples=16, progress=False)
    record = prune_model(net, data, out=str(folder), resume=True, **settings)
    fresh, _ = _digits_run()
    fresh.load_state_dict(dense)
    assert prune_model(fresh, data, out=str(folder), resume=True, **settings)["n_keep"] == record["n_keep"]
    assert current_masks(fresh).keys() == current_masks(net).keys()
    assert all(torch.equal(current_masks(fresh)[k], current_masks(net)[k]) for k in current_masks(net))
    make_permanent(fresh)
    make_permanent(net)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def _digits_run():
    from engine.data import load_digits

    data = load_digits("train")
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), (data.images, data.labels)


@pytest.mark.parametrize("where, kwargs, argument", [
    ("prune", {"resume_from": "stage 1"}, "resume_from"),
    ("prune", {"on_progress": 3}, "on_progress"),
    ("prune", {"resume_from": resume.StageProgress(5, {}, [], {}, {})}, "resume_from"),
    ("layerwise", {"resume_from": 1}, "resume_from"),
    ("layerwise", {"on_progress": "no"}, "on_progress"),
    ("layerwise", {"resume_from": resume.LayerProgress({}, [object()], {})}, "resume_from"),
    ("prune_model", {"resume": "yes", "out": "x"}, "resume"),
    ("prune_model", {"resume": True}, "resume"),
    ("execute", {"resume": "yes"}, "resume"),
])
def test_each_new_argument_is_checked(where, kwargs, argument, tmp_path):
    from engine.api import prune_model
    from engine.layerwise import prune_layerwise
    from engine.pipeline import execute, prepare
    from engine.pruner import PruneConfig, prune

    net, data = _digits_run()
    names = ["0.weight", "2.weight"]
    with pytest.raises(InvalidOptionError, match=f"'{argument}' argument"):
        if where == "prune":
            prune(net, names, data, PruneConfig(sparsity=0.5, stages=2, fisher_samples=8, progress=False), **kwargs)
        elif where == "layerwise":
            prune_layerwise(net, names, [data[0][:32]], sparsity=0.5, method="magnitude", **kwargs)
        elif where == "prune_model":
            prune_model(net, data, sparsity=0.5, method="magnitude", **kwargs)
        else:
            execute(prepare(net, data, sparsity=0.5, settings={"method": "magnitude"}), out=str(tmp_path / "o"),
                    **kwargs)
