"""``charlm``: a small character-level GPT trained on Tiny Shakespeare, the zoo's language model.

The model is a Hugging Face ``GPT2LMHeadModel`` (4 layers, 4 heads, width 128, context 128, 65 characters,
an untied ``lm_head``), trained by ``scripts/train_charlm.py`` and shipped in :data:`CHARLM_DIR` as a
``save_pretrained`` folder (``config.json``, ``model.safetensors``) plus ``vocab.json`` (the 65 characters,
id order) and ``train_record.json`` (how it was trained).

Data (the char-rnn / nanoGPT convention): ``<data_dir>/text/tinyshakespeare.txt``; its first
``int(0.9 · len(text))`` characters train, the rest validate (:func:`split_text`). Both splits are cut into
non-overlapping windows of ``block`` characters, (input, next characters) pairs (:func:`engine.hub.char_dataset`).

Evaluation protocol (one definition, used by the training script, the tests and the zoo): the mean next-character
cross-entropy in nats over every predicted character of a deterministic set of windows of the validation split
(:func:`evaluation_windows`): all of them (the full split, 871 windows of 128, 111,488 predictions: the figure the
training record reports), or ``windows`` of them drawn without replacement by a ``torch.Generator`` seeded with
``seed``. Perplexity = exp(loss). Each window starts with an empty context, as in nanoGPT's ``estimate_loss``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .data import _require_file, _resolve_dir
from .errors import CheckpointError, invalid_option
from .hub import CausalLMLogits, CharDataset, char_dataset, load_hf_causal_lm, token_cross_entropy

__all__ = [
    "CHARLM_DIR",
    "TEXT_FILE",
    "TRAIN_FRACTION",
    "BLOCK",
    "EVAL_SEED",
    "CharLMScore",
    "charlm_text",
    "split_text",
    "load_vocab",
    "charlm_data",
    "load_charlm",
    "evaluation_windows",
    "evaluate_charlm",
    "calibration_windows",
]

#: the packaged model folder (save_pretrained output, vocab.json, train_record.json)
CHARLM_DIR = Path(__file__).resolve().parent / "_data" / "charlm"
#: the text, relative to the data folder
TEXT_FILE = Path("text") / "tinyshakespeare.txt"
#: the training split: the first int(TRAIN_FRACTION · len(text)) characters
TRAIN_FRACTION = 0.9
#: the context length of the model and the window length of the data
BLOCK = 128
#: the seed of the evaluation windows' draw when only some of them are scored
EVAL_SEED = 0

PathLike = str | os.PathLike[str]
SPLITS = ("train", "val")


class CharLMScore(NamedTuple):
    """Validation score: ``loss`` (mean next-character cross-entropy, nats), ``perplexity`` = exp(loss),
    ``windows`` and ``tokens`` (the number of predictions averaged)."""

    loss: float
    perplexity: float
    windows: int
    tokens: int


def charlm_text(data_dir: PathLike | None = None) -> str:
    """The text of ``<data_dir>/text/tinyshakespeare.txt`` (``data_dir``: default :func:`engine.data.default_data_dir`).

    Raises DataNotFoundError, naming ``--data-dir``, when the file is missing."""
    return _require_file(_resolve_dir(data_dir) / TEXT_FILE, "Tiny Shakespeare").read_text(encoding="utf-8")


def split_text(text: str) -> tuple[str, str]:
    """(train, validation) = (text[:cut], text[cut:]), cut = int(TRAIN_FRACTION · len(text)) (1,003,854 of
    Tiny Shakespeare's 1,115,394 characters)."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def load_vocab(path: PathLike | None = None) -> dict[str, int]:
    """char → id from ``<path>/vocab.json`` (a JSON list of the characters in id order; default the packaged one)."""
    file = Path(CHARLM_DIR if path is None else path) / "vocab.json"
    try:
        chars = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read the charlm vocabulary '{file}': {type(exc).__name__}: {exc}") from None
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars) \
            or len(set(chars)) != len(chars):
        raise CheckpointError(f"The charlm vocabulary '{file}' must be a JSON list of distinct single characters.")
    return {c: i for i, c in enumerate(chars)}


def charlm_data(data_dir: PathLike | None = None, block: int = BLOCK, split: str | None = None,
                vocab: dict[str, int] | None = None) -> tuple[CharDataset, CharDataset] | CharDataset:
    """The Tiny Shakespeare windows: ``(train, val)`` :class:`~engine.hub.CharDataset` s (``split=None``), or the
    one named by ``split`` ("train" or "val"). Items are (input, next characters), both (block,) int64.

    ``vocab``: char → id, default the packaged model's (:func:`load_vocab`); it must hold every character."""
    if split is not None and split not in SPLITS:
        raise invalid_option("split", "charlm_data()", "None, 'train' or 'val'", repr(split))
    vocab = load_vocab() if vocab is None else vocab
    parts = dict(zip(SPLITS, split_text(charlm_text(data_dir))))
    sets = {name: char_dataset(part, block, vocab) for name, part in parts.items() if split in (None, name)}
    return (sets["train"], sets["val"]) if split is None else sets[split]


def load_charlm(path: PathLike | None = None) -> tuple[CausalLMLogits, dict[str, int]]:
    """(model, vocab) from a ``save_pretrained`` folder (default :data:`CHARLM_DIR`): the model through
    :func:`engine.hub.load_hf_causal_lm` (token ids (B, T) → logits (B, T, 65), float32, eval mode), the vocab
    from the folder's ``vocab.json`` (the packaged one when the folder has none).

    Raises CheckpointError when the model's vocabulary size is not the vocab's."""
    folder = Path(CHARLM_DIR if path is None else path)
    model = load_hf_causal_lm(folder)
    vocab = load_vocab(folder if (folder / "vocab.json").is_file() else None)
    size = model.model.config.vocab_size
    if size != len(vocab):
        raise CheckpointError(f"The charlm model in '{folder}' has {size} tokens, its vocabulary {len(vocab)}.")
    return model, vocab


def evaluation_windows(count: int, windows: int | None = None, seed: int = EVAL_SEED) -> torch.Tensor:
    """Indices (int64, ascending) of the windows scored among ``count``: all of them when ``windows`` is None
    or ≥ count, else the first ``windows`` of ``torch.randperm(count)`` drawn with a Generator seeded ``seed``."""
    if windows is None or windows >= count:
        return torch.arange(count)
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise invalid_option("windows", "evaluate_charlm()", "None or an integer >= 1", repr(windows))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:windows].sort().values


def calibration_windows(dataset: CharDataset, count: int, seed: int = 0, batch: int = 32) -> list[torch.Tensor]:
    """Calibration inputs for layer-wise pruning: the first ``count`` windows of ``torch.randperm(len(dataset))``
    drawn with a Generator seeded ``seed``, in that order, as id batches (≤ ``batch``, T) of the inputs."""
    for name, value in (("count", count), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid_option(name, "calibration_windows()", "an integer >= 1", repr(value))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return [torch.stack([dataset[int(i)][0] for i in order[s : s + batch]]) for s in range(0, len(order), batch)]


@torch.no_grad()
def evaluate_charlm(model: nn.Module, dataset: CharDataset, windows: int | None = None, seed: int = EVAL_SEED,
                    batch_size: int = 64) -> CharLMScore:
    """Mean next-character cross-entropy (nats) and perplexity of ``model`` (ids (B, T) → logits (B, T, V), e.g.
    :class:`~engine.hub.CausalLMLogits`) on the windows of ``dataset`` that :func:`evaluation_windows` picks:

        loss = (1 / (W · T)) Σ_w Σ_t −log softmax(model(x_w))[t, y_w[t]],   perplexity = exp(loss).

    Runs in eval mode (the model's mode is restored after), sums in float64."""
    index = evaluation_windows(len(dataset), windows, seed)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(index), batch_size):
            pairs = [dataset[int(i)] for i in index[start : start + batch_size]]
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            total += float(token_cross_entropy(model(x), y).double()) * y.numel()
            tokens += y.numel()
    finally:
        model.train(was_training)
    loss = total / tokens
    return CharLMScore(loss, math.exp(loss), len(index), tokens)
