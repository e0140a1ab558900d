"""Models from Hugging Face ``transformers`` and ``timm`` for pruning, loaded from local files only.

The engine's contract for a model (DESIGN.md §2b, "inputs are the user's"): an ``nn.Module`` whose forward
maps a batch of inputs (one tensor) to one outputs tensor, a loss ``loss(outputs, targets) -> scalar tensor``
(mean over the batch) and a metric ``metric(outputs, targets) -> float`` (mean over the batch). This module
adapts the two big model zoos to it:

* :func:`load_hf_causal_lm` loads a folder written by ``save_pretrained()`` (never the network: only
  ``local_files_only=True``) and wraps it in :class:`CausalLMLogits`, whose forward maps token ids
  (B, T) int64 to logits (B, T, V) float32. Parameter names keep the Hugging Face ones under ``model.``
  (``model.transformer.h.0.attn.c_attn.weight``), so state dicts round-trip.
* :func:`token_cross_entropy` and :func:`token_accuracy` are the loss and metric of next-token
  prediction; both run under ``torch.func.vmap`` over a leading row dimension, as the per-sample
  gradients of ``engine.fisher`` need.
* :func:`load_timm_model` builds a randomly initialised ``timm`` network by name (``pretrained=False``).
* :func:`is_transposed_linear` and :func:`linear_like_modules` find the weights a pruner may touch,
  including GPT-2's ``Conv1D``, whose weight is stored transposed: (in_features, out_features).
* :func:`char_dataset` cuts a text into character-level (input, next-token target) windows.

``transformers``, ``safetensors`` and ``timm`` are optional (extras ``cbs-prune[hf]`` and
``cbs-prune[timm]``) and imported only inside the functions that need them, so ``import engine.hub``
works without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CBSError, CheckpointError, DataNotFoundError, first_line, invalid_option

__all__ = [
    "ExtraNotInstalledError",
    "CausalLMLogits",
    "load_hf_causal_lm",
    "token_cross_entropy",
    "token_accuracy",
    "load_timm_model",
    "is_transposed_linear",
    "linear_like_modules",
    "CharDataset",
    "char_dataset",
    "IGNORE_INDEX",
]

#: Targets equal to this value are left out of :func:`token_cross_entropy` and :func:`token_accuracy`
#: (the value ``torch.nn.functional.cross_entropy`` and Hugging Face labels use for padding).
IGNORE_INDEX = -100

PathLike = str | os.PathLike[str]


class ExtraNotInstalledError(CBSError, ImportError):
    """An optional package (an "extra" of cbs-prune) is needed and cannot be imported; the message says
    which extra to install."""


def _import_transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ExtraNotInstalledError(
            f"{where} needs the 'transformers' package, which cannot be imported ({first_line(exc)}). "
            "Install it with: pip install 'cbs-prune[hf]'"
        ) from None
    return transformers


# --------------------------------------------------------------------------------------------------
# Hugging Face causal language models


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as the engine wants it: token ids in, logits out.

    ``forward(input_ids)``: ``input_ids`` (B, T) int64, T ≤ the model's context length →
    logits (B, T, V) in the model's dtype, where logits[b, t] scores the token that follows
    input_ids[b, t]. No key/value cache (``use_cache=False``), no attention mask (every row is a full
    window), so the call is a pure function of the weights and works under ``torch.func``.

    The Hugging Face model is the submodule ``model``: parameter and state-dict names are the Hugging
    Face ones prefixed by ``model.`` (e.g. ``model.transformer.h.0.attn.c_attn.weight``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _check_path(path: Any, where: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise invalid_option(
            "path", where, "a str or os.PathLike naming a local folder", f"{type(path).__name__} {path!r}"
        )
    folder = Path(path)
    if not folder.exists():
        raise DataNotFoundError(f"The 'path' argument of {where} names no file or folder. Got '{folder}'.")
    return folder


def load_hf_causal_lm(path: PathLike, attn_implementation: str | None = "eager") -> CausalLMLogits:
    """Load a causal LM saved by ``save_pretrained()`` from the local folder ``path``, float32, eval mode.

    Calls ``transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=float32)``:
    nothing is ever downloaded, and remote code is never trusted (``trust_remote_code`` stays False).

    ``attn_implementation``: passed to ``from_pretrained``. The default ``"eager"`` is plain matmul +
    softmax attention, which ``torch.func.vmap`` batches natively; the CPU ``"sdpa"`` kernel has no vmap
    batching rule (vmap falls back to a slow loop, with a warning). ``None`` keeps transformers' choice.

    Returns a :class:`CausalLMLogits` (forward: (B, T) int64 → (B, T, V) logits).

    Raises :class:`ExtraNotInstalledError` without transformers, :class:`~engine.errors.InvalidOptionError`
    when ``path`` is not a str/PathLike or not a folder with ``config.json``,
    :class:`~engine.errors.DataNotFoundError` when it does not exist, and
    :class:`~engine.errors.CheckpointError` when transformers cannot load what the folder holds.
    """
    where = "load_hf_causal_lm()"
    folder = _check_path(path, where)
    if not (folder / "config.json").is_file():
        raise invalid_option(
            "path", where, "a folder saved by save_pretrained() (holding config.json)", f"'{folder}'"
        )
    transformers = _import_transformers(where)
    # transformers >= 4.56 calls the argument `dtype` (and warns about `torch_dtype`); older ones `torch_dtype`
    version = tuple(int(p) if p.isdigit() else 0 for p in transformers.__version__.split(".")[:2])
    kwargs: dict[str, Any] = {"dtype" if version >= (4, 56) else "torch_dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        # OSError: weights missing; ValueError/KeyError: a config transformers does not know or not a causal LM
        raise CheckpointError(
            f"transformers cannot load a causal LM from '{folder}': {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return CausalLMLogits(model.float()).eval()


def _flat(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits and (...) targets → (M, V) and (M,), M = the product of the leading dimensions."""
    return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)


def token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats), a scalar tensor.

    ``outputs`` (B, T, V) logits; ``targets`` (B, T) int64, the *next* tokens aligned with the inputs
    (targets[:, t] is the token after inputs[:, t], the nanoGPT convention; :func:`char_dataset` yields
    such pairs). With z = outputs[b, t] and y = targets[b, t]:

        L = (1 / |M|) Σ_{(b, t) ∈ M} [ log Σ_v exp(z_v) − z_y ],   M = {(b, t) : y ≠ IGNORE_INDEX}.

    Any leading shape works ((T, V) with (T,) too); it is a pure tensor function, so it runs under
    ``torch.func.vmap`` over a leading row dimension (each row then sees its own (B, T, V)).
    """
    logits, labels = _flat(outputs, targets)
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def token_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float | torch.Tensor:
    """Percent of tokens whose argmax logit is the target: 100 · |{argmax_v z_v = y}| / |M| over the same
    tokens M as :func:`token_cross_entropy` (shapes as there).

    Returns a Python float; under ``torch.func.vmap`` (where a tensor cannot become a number) it returns the
    0-dim float32 tensor instead, so the same function serves both. With no counted token it is 0.
    """
    logits, labels = _flat(outputs, targets)
    counted = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & counted
    value = 100.0 * correct.sum().to(torch.float32) / counted.sum().clamp(min=1).to(torch.float32)
    try:
        return float(value)
    except RuntimeError:  # inside vmap: .item() is not batchable, hand back the (batched) tensor
        return value


# --------------------------------------------------------------------------------------------------
# timm


def load_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` in eval mode: random weights, no download.

    Load trained weights yourself (``model.load_state_dict(...)``, e.g. with ``safetensors.torch.load_file``).
    Raises :class:`ExtraNotInstalledError` when timm cannot be imported (timm needs torchvision built for
    the installed torch) and :class:`~engine.errors.InvalidOptionError` for a name timm does not know.
    """
    where = "load_timm_model()"
    if not isinstance(name, str) or not name:
        raise invalid_option("name", where, "a timm model name (a non-empty str)", repr(name))
    if kwargs.get("pretrained"):
        raise invalid_option("pretrained", where, "False (cbs never downloads weights)", kwargs["pretrained"])
    kwargs.pop("pretrained", None)
    try:
        import timm
    except Exception as exc:  # a torchvision built for another torch fails with RuntimeError/OSError, not ImportError
        raise ExtraNotInstalledError(
            f"{where} needs the 'timm' package, which cannot be imported ({type(exc).__name__}: "
            f"{first_line(exc)}). Install it with: pip install 'cbs-prune[timm]' "
            "(timm needs torchvision, built for the installed torch)"
        ) from None
    if not timm.is_model(name):
        raise invalid_option("name", where, "a model name timm knows (see timm.list_models())", repr(name))
    return timm.create_model(name, pretrained=False, **kwargs).eval()


# --------------------------------------------------------------------------------------------------
# Layers a pruner may touch


def _hf_conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers absent or broken: fall back to the name test
        return None
    return Conv1D


def _is_conv1d(module: nn.Module, conv1d: type | None) -> bool:
    if conv1d is not None and isinstance(module, conv1d):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_transposed_linear(module: nn.Module) -> bool:
    """True for a GPT-2 style ``Conv1D`` (transformers.pytorch_utils.Conv1D): a linear layer
    y = x W + b whose ``weight`` W is stored (in_features, out_features), the transpose of ``nn.Linear``'s
    (out_features, in_features). Detected by class when transformers imports, else by the class name
    ``Conv1D`` together with the attribute ``nf`` (= out_features).
    """
    return _is_conv1d(module, _hf_conv1d_class())


def linear_like_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and GPT-2 ``Conv1D`` of ``model`` in module order
    (``model.named_modules()``), as (name, module, transposed); transposed is True exactly for ``Conv1D``
    (weight (in, out), see :func:`is_transposed_linear`).

    A module reached twice is listed once; a weight *tied* between two modules (GPT-2's ``lm_head`` and
    ``wte``) is listed under each module that uses it.
    """
    conv1d = _hf_conv1d_class()
    found = []
    for name, module in model.named_modules():
        if _is_conv1d(module, conv1d):  # the class looked up once, not per module
            found.append((name, module, True))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found.append((name, module, False))
    return found


# --------------------------------------------------------------------------------------------------
# Character-level text


class CharDataset(torch.utils.data.Dataset):
    """Non-overlapping character windows of a text: item i = (input, target), both (block,) int64, with
    input = ids[i·block : (i+1)·block] and target = ids[i·block + 1 : (i+1)·block + 1] (the next characters),
    where ids[j] = vocab[text[j]]. There are (len(text) − 1) // block items.

    Attributes: ``vocab`` (char → id), ``chars`` (id → char), ``ids`` (len(text),) int64, ``block``.
    """

    def __init__(self, ids: torch.Tensor, vocab: Mapping[str, int], block: int) -> None:
        self.ids = ids
        self.vocab = dict(vocab)
        self.chars = {i: c for c, i in self.vocab.items()}
        self.block = block

    def __len__(self) -> int:
        return (self.ids.numel() - 1) // self.block

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"CharDataset index {index} out of range for {n} windows")
        start = (index % n) * self.block
        return self.ids[start : start + self.block], self.ids[start + 1 : start + self.block + 1]

    def decode(self, ids: torch.Tensor) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in ids.reshape(-1))


def char_dataset(text: str, block: int, vocab: Mapping[str, int] | None = None) -> CharDataset:
    """A :class:`CharDataset` of ``text`` with windows of ``block`` characters.

    ``vocab`` (char → id): default, the sorted distinct characters of ``text`` numbered 0, 1, ...
    (65 for Tiny Shakespeare). Pass the training split's vocab when building the validation split.
    """
    where = "char_dataset()"
    if not isinstance(text, str):
        raise invalid_option("text", where, "a str", type(text).__name__)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise invalid_option("block", where, "an integer >= 1", repr(block))
    if len(text) < block + 1:
        raise invalid_option("text", where, f"at least block + 1 = {block + 1} characters long", len(text))
    if vocab is None:
        vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    unknown = sorted(set(text) - set(vocab))
    if unknown:
        raise invalid_option("vocab", where, "a mapping that holds every character of the text",
                             f"{len(unknown)} missing, e.g. {unknown[:5]!r}")
    table = [vocab[c] for c in text]
    return CharDataset(torch.tensor(table, dtype=torch.int64), vocab, block)
