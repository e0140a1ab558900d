"""Writing a pruning result into a model: masks (torch pruning masks, removable) and new weights.

The edit is transactional (DESIGN.md §4): the caller computes every new tensor first; :func:`apply_pruning`
then writes them all, and restores the model exactly if anything fails on the way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from .errors import invalid_option

__all__ = ["apply_pruning", "make_permanent", "current_masks", "sparsity", "resolve"]


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) of a parameter name like ``"layer1.0.conv1.weight"``."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise invalid_option("parameter name", "resolve()", "a parameter of the model", repr(name)) from None
    if not hasattr(module, attr):
        raise invalid_option("parameter name", "resolve()", "a parameter of the model", repr(name))
    return module, attr


def _is_pruned(module: nn.Module, attr: str) -> bool:
    return hasattr(module, attr + "_mask") and hasattr(module, attr + "_orig")


def apply_pruning(model: nn.Module, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Set each named parameter to ``weights[name]`` and attach ``masks[name]`` (bool, same shape) as a torch
    pruning mask (``weight_orig`` · ``weight_mask``). All or nothing: on any error the model is restored.

    A parameter that is already masked gets its mask replaced and its original tensor overwritten.
    """
    for name, value in weights.items():
        if name not in masks:
            raise invalid_option("masks", "apply_pruning()", "a mask for every updated parameter", f"no mask for {name!r}")
        if masks[name].shape != value.shape:
            raise invalid_option(
                "masks", "apply_pruning()", "shaped like the weights", f"{tuple(masks[name].shape)} for {name!r}"
            )
    targets = {name: resolve(model, name) for name in weights}
    backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, (module, attr) in targets.items():
        if _is_pruned(module, attr):
            backup[name] = (getattr(module, attr + "_orig").detach().clone(), getattr(module, attr + "_mask").clone())
        else:
            backup[name] = (getattr(module, attr).detach().clone(), None)
    done: list[str] = []
    try:
        for name, (module, attr) in targets.items():
            if _is_pruned(module, attr):
                prune.remove(module, attr)
            param = getattr(module, attr)
            with torch.no_grad():
                param.copy_(weights[name].to(param.dtype) * masks[name].to(param.dtype))
            prune.custom_from_mask(module, attr, masks[name].to(param.device, torch.bool))
            done.append(name)
    except Exception:
        for name in targets:
            module, attr = targets[name]
            if _is_pruned(module, attr):
                prune.remove(module, attr)
            original, mask = backup[name]
            with torch.no_grad():
                getattr(module, attr).copy_(original)
            if mask is not None:
                prune.custom_from_mask(module, attr, mask)
        raise


def make_permanent(model: nn.Module) -> None:
    """Fold every pruning mask into its parameter (zeros stay zeros) and drop the masks."""
    for module in model.modules():
        for attr in [k[: -len("_mask")] for k, _ in list(module.named_buffers(recurse=False)) if k.endswith("_mask")]:
            if _is_pruned(module, attr):
                prune.remove(module, attr)


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of every masked parameter."""
    out = {}
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname.endswith("_mask"):
                out[(mname + "." if mname else "") + bname[: -len("_mask")]] = buf.bool().clone()
    return out


def sparsity(model: nn.Module, names: list[str]) -> float:
    """Fraction of exact zeros among the named parameters (masks applied)."""
    total = zeros = 0
    for name in names:
        module, attr = resolve(model, name)
        t = getattr(module, attr)
        total += t.numel()
        zeros += int((t == 0).sum())
    return zeros / max(total, 1)
