"""A tiny Hugging Face GPT-2 (random init, fixed seed, built in the test: no download) pruned end to end
from the command line: next-token loss by default, Conv1D weights (stored (in, out)) pruned by output row."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'cbs-prune[hf]'")

from engine.cli import main  # noqa: E402

TEXT = "to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40

DATA_FILE = f'''
from engine.hub import char_dataset

TEXT = {TEXT!r}


def data():
    cut = int(len(TEXT) * 0.9)
    train = char_dataset(TEXT[:cut], block=32)
    return train, char_dataset(TEXT[cut:], block=32, vocab=train.vocab)
'''


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    vocab = len(sorted(set(TEXT)))
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    data = folder / "chars.py"
    data.write_text(DATA_FILE)
    return folder, data


def test_tiny_gpt2_pruned_by_output_row_from_the_cli(tiny_gpt2, tmp_path, capsys):
    folder, data = tiny_gpt2
    out = tmp_path / "run"
    code = main(["prune", "--model", f"hf:{folder}", "--data", f"{data}:data", "--sparsity", "0.5",
                 "--method", "magnitude", "--update", "--fisher-samples", "16", "--block-mode", "row",
                 "--allocation", "uniform", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    rec = json.loads((out / "record.json").read_text())
    assert rec["loss"] == "token_cross_entropy" and rec["metric"] == "token_accuracy"
    names = rec["parameters"]
    assert "model.transformer.h.0.attn.c_attn.weight" in names and "model.lm_head.weight" not in names
    assert not any("wte" in n for n in names)  # the embedding tied to lm_head is not pruned by default
    assert set(rec["transposed_parameters"]) == {n for n in names if ".c_" in n}
    masks = torch.load(out / "mask.pt")
    attn = masks["model.transformer.h.0.attn.c_attn.weight"]
    assert attn.shape == (32, 96)
    # one block per OUTPUT unit: every column of the (in, out) weight keeps half of its 32 weights
    assert torch.equal(attn.sum(0), torch.full((96,), 16))
    assert abs(rec["achieved_sparsity"] - 0.5) < 1e-3
    assert all(b["gap"] is not None and b["bound"] <= b["objective"] + 1e-9 for b in rec["blocks"])
    state = torch.load(out / "model.pt")
    w = state["model.transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(w[~attn], torch.zeros(int((~attn).sum())))
    assert rec["test_loss"] > 0 and 0 <= rec["accuracy"] <= 100


def test_tiny_timm_model_pruned_from_the_cli(tmp_path, capsys):
    """timm needs torchvision, which does not install beside the CPU torch of this project's machines: the test
    runs wherever timm imports."""
    pytest.importorskip("timm", reason="timm is not installed (it needs torchvision): pip install 'cbs-prune[timm]'")
    data = tmp_path / "images.py"
    data.write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n\n\ndef data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g)\n"
        "    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])\n")
    out = tmp_path / "run"
    code = main(["prune", "--model", "timm:resnet10t", "--data", f"{data}:data", "--sparsity", "0.5", "--method",
                 "magnitude", "--fisher-samples", "8", "--no-bn-reestimate", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "record.json").read_text())
    assert rec["model"] == "timm:resnet10t" and abs(rec["achieved_sparsity"] - 0.5) < 1e-3
