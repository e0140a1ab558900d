"""Your own model, data, loss, metric, checkpoint and parameter set, from the command line and the API:
every good form loads, every bad form is one clear error (exit 2) before any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from engine.api import prune_model
from engine.cli import main
from engine.errors import CheckpointError, InvalidOptionError
from engine.models import load_checkpoint
from engine.params import select_parameters
from engine.sources import Samples

USER_FILE = '''
import torch
from torch import nn
from torch.utils.data import Dataset, DataLoader, TensorDataset


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class Counted(Dataset):
    """A lazily generated data set that counts the samples read."""
    reads = 0

    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        Counted.reads += 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.randn(6, generator=g)
        return x, int(x[:3].argmax())


def data():
    return Counted(600, 1), Counted(200, 2)


def loader_data():
    a, b = data()
    return DataLoader(a, batch_size=32), DataLoader(b, batch_size=50)


def big_data():
    return Counted(200_000, 3), Counted(100, 4)


def loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)


def metric(outputs, targets):
    return 100.0 * float((outputs.argmax(-1) != targets).float().mean())  # the error rate


def raises():
    raise ValueError("width must be positive")


def not_a_model():
    return 42


def not_pairs():
    return [torch.zeros(6)] * 10, None


def out_of_range():
    return TensorDataset(torch.randn(50, 6), torch.full((50,), 7)), None


def wrong_return():
    return TensorDataset(torch.randn(5, 6), torch.zeros(5, dtype=torch.long))
'''


@pytest.fixture()
def user(tmp_path):
    path = tmp_path / "user_net.py"
    path.write_text(USER_FILE)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    ckpt = tmp_path / "net.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return path, ckpt, model


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _prune_argv(path, ckpt, out, *extra):
    return ["prune", "--model", f"{path}:model", "--data", f"{path}:data", "--checkpoint", str(ckpt),
            "--sparsity", "0.5", "--out", str(out), "--no-progress", *extra]


def test_own_model_data_loss_metric_from_the_cli(user, tmp_path, capsys):
    path, ckpt, _ = user
    out = tmp_path / "run"
    code, stdout, err = _run(_prune_argv(path, ckpt, out, "--loss", f"{path}:loss", "--metric", f"{path}:metric",
                                         "--method", "swap", "--fisher-samples", "64"), capsys)
    assert code == 0, err
    rec = json.loads((out / "record.json").read_text())
    assert rec["loss"] == f"{path}:loss" and rec["metric"] == f"{path}:metric"
    assert rec["parameters"] == ["0.weight", "2.weight"] and rec["method"] == "swap"
    assert rec["profile"]["kind"] == "small" and not rec["bn_reestimate"]
    assert "cbs prune: running --method swap" in err
    mask = torch.load(out / "mask.pt")
    assert set(mask) == {"0.weight", "2.weight"}
    assert abs(rec["achieved_sparsity"] - 0.5) < 1e-3
    for f in ("record.json", "mask.pt", "model.pt"):
        assert (out / f).stat().st_mode & 0o777 == 0o644


def test_recommendation_for_a_model_outside_the_zoo_comes_from_its_properties(user, tmp_path, capsys):
    path, _, _ = user
    out = tmp_path / "bn"
    code, _, err = _run(["prune", "--model", f"{path}:bn_model", "--data", f"{path}:loader_data", "--sparsity",
                         "0.5", "--stages", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((out / "record.json").read_text())
    assert rec["profile"]["kind"] == "batchnorm" and rec["bn_reestimate"] and rec["bn_augment"] == "none"
    s = rec["settings"]
    # 600 training samples: the recommendation's rows shrink to fit them
    assert s["fisher_samples"] * s["fisher_batch"] + s["loss_samples"] <= 600 and s["holdout_loss"]
    assert "--param holdout_loss=true" in err and "--bn-reestimate" in err
    assert "accuracy_no_bn_reestimate" in rec


def test_data_are_streamed_not_materialised(user, monkeypatch):
    """200,000 lazily generated samples: the run reads only the samples it draws."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_net_streamed", user[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, test = mod.big_data()
    net = mod.model()
    mod.Counted.reads = 0
    rec = prune_model(net, train, test, sparsity=0.5, method="woodfisher", fisher_samples=100, loss_samples=50)
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # the Fisher draw and the loss samples, a few first samples to check the data, the 100 test samples twice
    assert mod.Counted.reads <= 100 + 50 + 4 + 2 * 100


@pytest.mark.parametrize("spec, pattern", [
    ("nofile.py:model", r"'--model'.*'nofile.py' does not exist"),
    ("{path}:missing", r"'--model'.*has no function 'missing'"),
    ("{path}:raises", r"'--model'.*raised ValueError: width must be positive"),
    ("{path}:not_a_model", r"'--model'.*must return a torch.nn.Module. Got a int"),
    ("{path}", r"'--model'.*FILE.py:FUNC"),
    ("no_such_package.mod:fn", r"'--model'.*cannot import module 'no_such_package.mod'"),
])
def test_bad_model_specs_exit_2_with_one_line(user, tmp_path, capsys, spec, pattern):
    path, _, _ = user
    _refused(spec.format(path=path), f"{path}:data", pattern, tmp_path, capsys)


def _refused(model, data, pattern, tmp_path, capsys):
    """cbs prune with these specs exits 2 with one line matching ``pattern`` and writes nothing."""
    code, _, err = _run(["prune", "--model", model, "--data", data, "--sparsity", "0.5", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("func, pattern", [
    ("not_pairs", r"\(input, target\) pairs"),
    ("out_of_range", r"class indices in \[0, 2\].*Got targets in \[7, 7\]"),
    ("wrong_return", r"must return \(train, test\)"),
    ("raises", r"raised ValueError"),
])
def test_bad_data_exit_2_with_one_line(user, tmp_path, capsys, func, pattern):
    path, _, _ = user
    _refused(f"{path}:model", f"{path}:{func}", pattern, tmp_path, capsys)


def test_model_outside_the_zoo_needs_data(user, tmp_path, capsys):
    path, _, _ = user
    code, _, err = _run(["prune", "--model", f"{path}:model", "--sparsity", "0.5", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "'--data'" in err and "required" in err


# ----------------------------------------------------------------------------- checkpoints
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "module_prefix", "safetensors"])
def test_checkpoint_forms_load(user, tmp_path, form):
    _, _, trained = user
    state = _state(trained)
    path = tmp_path / ("c.safetensors" if form == "safetensors" else "c.pt")
    if form == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed: pip install 'cbs-prune[hf]'")
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
               "module_prefix": {f"module.{k}": v for k, v in state.items()}}[form]
        torch.save(obj, path)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    load_checkpoint(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(user, tmp_path):
    """The storages are tagged 'cuda:0' as torch.save writes them on a GPU (the tag is written by a
    subprocess that registers a tagger, so this process stays untouched); without map_location such a file
    does not load on a machine without CUDA."""
    _, _, trained = user
    src = tmp_path / "cpu.pt"
    torch.save(_state(trained), src)
    dst = tmp_path / "gpu.pt"
    script = textwrap.dedent(f"""
        import torch
        torch.serialization.register_package(0, lambda storage: "cuda:0", lambda obj, location: None)
        torch.save(torch.load({str(src)!r}), {str(dst)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(dst, weights_only=True)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    load_checkpoint(fresh, dst)
    for k, v in fresh.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, trained.state_dict()[k])


def test_checkpoint_mismatch_is_one_error_naming_the_keys(user, tmp_path, capsys):
    path, _, trained = user
    state = _state(trained)
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    state["0.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), bad)
    message = str(err.value)
    assert "2.bias" in message and "extra.weight" in message and "0.weight (checkpoint (3, 3), model (16, 6))" in message
    code, _, err_text = _run(_prune_argv(path, bad, tmp_path / "o"), capsys)
    assert code == 2 and "2.bias" in err_text and len(err_text.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- parameters
def test_params_by_glob_type_and_default():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    assert select_parameters(net)[0] == ["0.weight", "3.weight", "4.weight"]
    assert select_parameters(net, "Linear")[0] == ["3.weight", "4.weight"]
    assert select_parameters(net, "Conv2d,4.*")[0] == ["0.weight", "4.weight", "4.bias"]
    with pytest.raises(InvalidOptionError, match="'params'.*'nope\\*'"):
        select_parameters(net, "nope*")
    with pytest.raises(InvalidOptionError, match="'preset'.*outside the zoo"):
        select_parameters(net, "cbs")


def test_tied_embedding_is_not_pruned_by_default():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.hidden = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    names, _ = select_parameters(Tied())
    assert names == ["hidden.weight"]


def test_samples_accept_tensors_datasets_and_loaders():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(20, 3), torch.arange(20) % 2
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=7)):
        s = Samples(data)
        assert len(s) == 20
        d = s.draw(5, seed=0, what="n")
        xs, ys = d.tensors()
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:5]
        assert torch.equal(xs, x[perm]) and torch.equal(ys, y[perm])
    with pytest.raises(InvalidOptionError, match="'n'.*at most the 20"):
        Samples((x, y)).draw(21, seed=0, what="n")
    with pytest.raises(InvalidOptionError, match="Dataset"):
        Samples(42)


def test_gradient_rows_that_cannot_fit_in_memory_are_refused_before_any_work():
    import os

    from engine.config import PruneConfig
    from engine.pruner import check_prune_inputs

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    net = nn.Sequential(nn.Linear(1000, 1000))
    rows = int(physical / (1000 * 1000 * 4)) + 1  # one row more than the whole memory holds
    config = PruneConfig(sparsity=0.5, method="woodfisher", fisher_samples=rows)
    with pytest.raises(InvalidOptionError, match="'fisher_samples'.*GiB.*--params"):
        check_prune_inputs(net, ["0.weight"], 10**9, config)


def test_prune_model_rejects_unknown_settings_and_bad_batchnorm_settings(user):
    from engine.pipeline import BatchNormPlan

    net = nn.Sequential(nn.Linear(6, 3))
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    with pytest.raises(InvalidOptionError, match="'nope' argument of prune_model"):
        prune_model(net, data, sparsity=0.5, nope=1)
    with pytest.raises(InvalidOptionError, match="'bn_samples'.*>= 1. Got 0"):
        BatchNormPlan(0)
    with pytest.raises(InvalidOptionError, match="'bn_augment'.*crop-flip"):
        BatchNormPlan(10, "mirror")
