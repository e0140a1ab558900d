"""Checkpoint files: reading a saved state dict and strictly loading it into a model.

:func:`load_state_dict_file` reads ``.npz`` archives, ``.safetensors`` files and torch files (always
with ``weights_only=True``) into a flat ``{name: tensor}`` dict with normalised keys;
:func:`load_checkpoint` loads such a file strictly into a model, with one CheckpointError listing
every mismatch. Re-exported by :mod:`engine.models`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, DataNotFoundError, first_line

__all__ = ["load_state_dict_file", "load_checkpoint"]

PathLike = str | os.PathLike[str]

# Non-tensor classes pickled (as bare class references) inside the published WoodFisher
# checkpoints. Allow-listing them lets us keep torch.load(weights_only=True), so loading a
# checkpoint never executes arbitrary pickled code.
_SAFE_CHECKPOINT_GLOBALS: list[Any] = [torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR]


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict with normalised keys.

    Accepts ``.npz`` archives of arrays, or torch files holding a state dict, or a dict with a
    ``state_dict`` / ``model_state_dict`` entry. Normalises the keys written by DataParallel
    (``module.`` prefix) and by WoodFisher's masked layers (``X._layer.weight`` with
    ``X._weight_mask`` becomes ``X.weight`` = weight * mask).

    Raises:
        DataNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is not a readable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(
            f"Checkpoint '{path}' does not exist. Pass the path of an existing checkpoint file "
            "(or --data-dir pointing at the shared data folder)."
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' is not a file.")
    readers = {".npz": _read_npz, ".safetensors": _read_safetensors}
    raw = readers.get(path.suffix, _read_torch)(path)
    return _normalise_keys(raw, path)


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: torch.from_numpy(np.array(archive[k])) for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"Checkpoint '{path}' is not a readable .npz archive of arrays: {exc}") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"Checkpoint '{path}' is a .safetensors file, and safetensors is not installed: "
                              "pip install 'cbs-prune[hf]'.") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise CheckpointError(f"Checkpoint '{path}' could not be read as safetensors ({first_line(exc)}).") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals(_SAFE_CHECKPOINT_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"Checkpoint '{path}' could not be read as a torch checkpoint with weights_only=True "
            f"({first_line(exc)})."
        ) from exc
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"Checkpoint '{path}' holds no state dict (expected a dict of tensors, or a dict with a "
            f"'state_dict' or 'model_state_dict' entry); found {type(obj).__name__}."
        )
    return {str(k): v for k, v in obj.items()}


def _normalise_keys(raw: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    stripped = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in raw.items()}
    masks = {k[: -len("._weight_mask")]: v for k, v in stripped.items() if k.endswith("._weight_mask")}
    out: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        if key.endswith("._weight_mask"):
            continue
        prefix, sep, rest = key.partition("._layer.")
        if sep:
            if rest == "weight" and prefix in masks:
                mask = masks[prefix]
                if mask.shape != value.shape:
                    raise CheckpointError(
                        f"Checkpoint '{path}': mask '{prefix}._weight_mask' has shape {tuple(mask.shape)} "
                        f"but weight '{key}' has shape {tuple(value.shape)}."
                    )
                value = value * mask.to(value.dtype)
            key = f"{prefix}.{rest}"
        out[key] = value
    return out


def load_checkpoint(model: nn.Module, path: PathLike, model_name: str = "the model") -> None:
    """Strictly load the checkpoint at ``path`` (any form :func:`load_state_dict_file` reads, always to the
    CPU) into ``model``; a mismatch is one CheckpointError naming the missing and unexpected keys and the
    shape mismatches."""
    _load_into(model, path, model_name)


def _load_into(model: nn.Module, path: PathLike, model_name: str) -> None:
    """Strictly load ``path`` into ``model``, with a message listing every mismatch."""
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_abbrev(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_abbrev(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) {_abbrev(shapes)}")
    if problems:
        raise CheckpointError(f"Checkpoint '{path}' does not match model '{model_name}': " + "; ".join(problems) + ".")
    kinds = [f"{k} ({state[k].dtype}, model {v.dtype})" for k, v in expected.items()
             if v.is_floating_point() and not state[k].is_floating_point()]
    if kinds:  # an integer tensor where the model holds floats is a wrong file, not weights to round
        raise CheckpointError(f"Checkpoint '{path}' has non-floating tensors where model '{model_name}' has "
                              f"floating ones: {_abbrev(kinds)}.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"Checkpoint '{path}' has non-finite values in {_abbrev(bad)}.")
    model.load_state_dict(state, strict=True)


def _abbrev(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
