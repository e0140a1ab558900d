"""charlm, the zoo's character-level GPT on Tiny Shakespeare: the packaged weights and their config, the 90/10
split of the text, the evaluation protocol, and ``cbs prune --model charlm`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.charlm import (
    CHARLM_DIR,
    TEXT_FILE,
    calibration_windows,
    charlm_data,
    charlm_text,
    evaluate_charlm,
    evaluation_windows,
    load_charlm,
    split_text,
)
from engine.cli import main
from engine.errors import DataNotFoundError

CHARS, TRAIN_CHARS, VAL_CHARS = 1_115_394, 1_003_854, 111_540


@pytest.fixture(scope="module")
def charlm():
    """(model, vocab) of the packaged charlm (needs transformers)."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'cbs-prune[hf]'")
    return load_charlm()


@pytest.fixture(scope="module")
def text_dir(shared_data):
    """The shared data folder, when it holds text/tinyshakespeare.txt."""
    if not (shared_data / TEXT_FILE).is_file():
        pytest.skip(f"{shared_data / TEXT_FILE} not found")
    return shared_data


def test_packaged_model_has_the_documented_config(charlm):
    model, vocab = charlm
    config = model.model.config
    assert (config.model_type, config.vocab_size, config.n_positions, config.n_embd, config.n_layer,
            config.n_head) == ("gpt2", 65, 128, 128, 4, 4)
    assert not config.tie_word_embeddings
    assert model.model.lm_head.weight.data_ptr() != model.model.transformer.wte.weight.data_ptr()
    assert model.model.transformer.h[0].attn.c_attn.bias is not None
    assert sum(p.numel() for p in model.parameters()) == 826_368
    assert list(vocab) == sorted(vocab) and list(vocab.values()) == list(range(65))
    assert not model.training and model(torch.zeros(2, 128, dtype=torch.int64)).shape == (2, 128, 65)
    record = json.loads((CHARLM_DIR / "train_record.json").read_text())
    assert record["final_val_loss"] <= 1.88 and record["seed"] == record["settings"]["seed"]


def test_the_split_is_the_first_90_percent_and_the_rest(text_dir):
    text = charlm_text(text_dir)
    assert len(text) == CHARS and len(set(text)) == 65
    train_text, val_text = split_text(text)
    assert (len(train_text), len(val_text)) == (TRAIN_CHARS, VAL_CHARS) and TRAIN_CHARS == int(0.9 * CHARS)
    assert train_text + val_text == text
    train, val = charlm_data(text_dir)
    assert (len(train), len(val)) == ((TRAIN_CHARS - 1) // 128, (VAL_CHARS - 1) // 128)
    x, y = val[0]
    assert val.decode(x) == text[TRAIN_CHARS : TRAIN_CHARS + 128]
    assert val.decode(y) == text[TRAIN_CHARS + 1 : TRAIN_CHARS + 129]
    x, y = train[len(train) - 1]  # the last training window predicts training characters only
    start = (len(train) - 1) * 128
    assert train.decode(y) == text[start + 1 : start + 129] and start + 129 <= TRAIN_CHARS
    assert charlm_data(text_dir, split="val").ids.equal(val.ids)


def test_a_missing_text_names_data_dir(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        charlm_data(tmp_path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        charlm_text(tmp_path / "absent")


def test_the_evaluation_windows_are_a_fixed_draw():
    assert torch.equal(evaluation_windows(871), torch.arange(871))
    chosen = evaluation_windows(871, 20)
    assert torch.equal(chosen, evaluation_windows(871, 20)) and len(set(chosen.tolist())) == 20
    assert torch.equal(chosen, chosen.sort().values) and not torch.equal(chosen, evaluation_windows(871, 20, seed=1))


def test_calibration_windows_are_a_seeded_draw_in_batches():
    from engine.errors import InvalidOptionError
    from engine.hub import CharDataset

    data = CharDataset(torch.arange(1001) % 7, {str(c): c for c in range(7)}, 10)  # 100 windows of 10 ids
    batches = calibration_windows(data, 70, seed=3, batch=32)
    assert [tuple(b.shape) for b in batches] == [(32, 10), (32, 10), (6, 10)]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:70]
    assert torch.equal(torch.cat(batches), torch.stack([data[int(i)][0] for i in order]))
    assert len(calibration_windows(data, 500)) == 4  # all 100 windows when more are asked for
    for name, bad in (("count", 0), ("batch", 1.5), ("count", True)):
        with pytest.raises(InvalidOptionError, match=f"'{name}' argument of calibration_windows"):
            calibration_windows(data, **{"count": 5, "batch": 32, name: bad})


def test_the_trained_weights_predict_the_validation_text(charlm, text_dir):
    model, vocab = charlm
    val = charlm_data(text_dir, split="val", vocab=vocab)
    score = evaluate_charlm(model, val, windows=20)
    assert (score.windows, score.tokens) == (20, 20 * 128)
    assert score.loss < 2.0, score  # an untrained model scores ln 65 = 4.17 nats
    assert score.perplexity == pytest.approx(math.exp(score.loss))


def test_cbs_prune_charlm_from_the_cli(charlm, text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "charlm", "--data-dir", str(text_dir), "--sparsity", "0.5",
                 "--method", "magnitude", "--fisher-samples", "8", "--block-mode", "row", "--allocation", "uniform",
                 "--threads", "2", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "record.json").read_text())
    assert rec["model"] == "charlm" and rec["checkpoint"] == str(CHARLM_DIR)
    assert rec["loss"] == "token_cross_entropy" and rec["metric"] == "token_accuracy"
    assert "tinyshakespeare" in rec["data"]
    assert "model.lm_head.weight" in rec["parameters"]  # untied: the output layer is pruned too
    assert not any("wte" in n or "wpe" in n for n in rec["parameters"])
    assert abs(rec["achieved_sparsity"] - 0.5) < 1e-3
    assert math.isfinite(rec["test_loss"]) and rec["dense_test_loss"] < 2.0
    assert rec["test_loss"] > rec["dense_test_loss"]
