"""Masks to train: random, magnitude, SNIP, GraSP, SynFlow scores at a sparsity, or a saved mask file.

A mask is a dict ``{parameter name: bool tensor of the parameter's shape}`` (True = kept), the format
``cbs prune --out DIR`` writes to ``DIR/mask.pt`` and ``engine.pruner.PruneReport.masks`` holds.

Scores (higher = keep), for a weight tensor θ and the cross-entropy loss L on a few training batches:

* ``random``: i.i.d. uniform scores (a seeded private generator).
* ``magnitude``: |θ|.
* ``snip`` (Lee et al. 2019): |∂L/∂θ ⊙ θ|, gradients summed over the batches.
* ``grasp`` (Wang et al. 2020): θ ⊙ (H g), with g = ∇L (logits / temperature 200, as in GraSP) and
  H g the Hessian-gradient product ∇(gᵀ∇L); GraSP removes the *largest* −θ ⊙ Hg, i.e. keeps the
  largest θ ⊙ Hg.
* ``synflow`` (Tanaka et al. 2020): data-free; all parameters replaced by |θ| (float64), an all-ones
  input, R = 1ᵀ f(1); score |θ ⊙ ∂R/∂θ|, pruned iteratively over ``rounds`` rounds with the
  exponential schedule density_r = (1 − s)^(r / rounds), rescoring the masked network each round.

Selection at sparsity s keeps k = round((1 − s) · n) weights: the k largest scores over all tensors
together (``scope="global"``) or k_t = round((1 − s) · n_t) in each tensor (``"layerwise"``); ties are
broken by a seeded random permutation so that equal scores (e.g. zero weights) do not keep a block.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CheckpointError, DataNotFoundError, invalid_option

__all__ = ["MASK_SOURCES", "SCOPES", "mask_scores", "select_mask", "make_mask", "load_mask_file", "mask_sparsity"]

#: Score-based mask sources (besides a file path).
MASK_SOURCES: tuple[str, ...] = ("random", "magnitude", "snip", "grasp", "synflow")
SCOPES: tuple[str, ...] = ("global", "layerwise")

PathLike = str | os.PathLike[str]


def _check_sparsity(sparsity: float, where: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1 or math.isnan(sparsity):
        raise invalid_option("sparsity", where, "in [0, 1)", sparsity)
    return float(sparsity)


def _loss_gradients(model: nn.Module, names: Sequence[str], images: torch.Tensor, labels: torch.Tensor,
                    batch_size: int, temperature: float = 1.0, hessian_product: bool = False) -> dict[str, torch.Tensor]:
    """Σ over batches of ∂L/∂θ (or of H g for GraSP), L = mean CE(logits / temperature)."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    total = {n: torch.zeros_like(params[n]) for n in names}
    batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    if not hessian_product:
        for x, y in batches:
            grads = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), chosen)
            for n, g in zip(names, grads):
                total[n] += g
        return total
    # GraSP: g = ∇L summed over batches (detached), then Hg = ∇(gᵀ∇L) batch by batch.
    g = _loss_gradients(model, names, images, labels, batch_size, temperature)
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), chosen, create_graph=True)
        inner = sum((gi * g[n]).sum() for n, gi in zip(names, grads))
        hg = torch.autograd.grad(inner, chosen)
        for n, h in zip(names, hg):
            total[n] += h
    return total


def _synflow_scores(model: nn.Module, names: Sequence[str], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|θ ⊙ ∂R/∂θ| of the masked, all-positive float64 copy of ``model`` on an all-ones input."""
    net = copy.deepcopy(model).double().eval()  # eval: BN uses its running statistics, no batch dependence
    params = dict(net.named_parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
        for n, m in masks.items():
            params[n].mul_(m.to(torch.float64))
    shape = _input_shape(model)
    out = net(torch.ones((1, *shape), dtype=torch.float64))
    grads = torch.autograd.grad(out.sum(), [params[n] for n in names])
    return {n: (g * params[n]).abs().detach().float() for n, g in zip(names, grads)}


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    from .models import MLP

    if isinstance(model, MLP):
        return (model.in_features,)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return (first.in_channels, 32, 32)


def mask_scores(model: nn.Module, names: Sequence[str], source: str, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, seed: int = 0, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Scores (float32, shaped like each parameter; higher = keep) of one source (not ``synflow``'s rounds).

    ``images``/``labels`` (N, ...)/(N,) are needed by ``snip`` and ``grasp``. The model's train/eval
    flags are left unchanged (scores are taken in eval mode, so BN statistics are not touched).
    """
    if source not in MASK_SOURCES:
        raise invalid_option("source", "mask_scores()", f"one of {', '.join(MASK_SOURCES)}", repr(source))
    params = dict(model.named_parameters())
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return {n: torch.rand(params[n].shape, generator=generator) for n in names}
    if source == "magnitude":
        return {n: params[n].detach().abs().float().clone() for n in names}
    if source == "synflow":
        return _synflow_scores(model, names, {})
    if images is None or labels is None or images.shape[0] == 0:
        raise invalid_option("images", "mask_scores()", f"training images and labels for {source!r}", None)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if source == "snip":
            grads = _loss_gradients(model, names, images, labels, batch_size)
            return {n: (grads[n] * params[n]).abs().detach().float() for n in names}
        hg = _loss_gradients(model, names, images, labels, batch_size, temperature=200.0, hessian_product=True)
        return {n: (params[n] * hg[n]).detach().float() for n in names}
    finally:
        for m, flag in flags:
            m.training = flag


def select_mask(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep the k = round((1 − sparsity) n) largest scores (globally or per tensor); bool masks.

    Ties are broken by a seeded random permutation. Layer-wise keeps at least one weight per tensor
    (so no layer is cut off entirely).
    """
    _check_sparsity(sparsity, "select_mask()")
    if scope not in SCOPES:
        raise invalid_option("scope", "select_mask()", "'global' or 'layerwise'", repr(scope))
    generator = torch.Generator().manual_seed(seed + 7919)
    names = list(scores)
    if scope == "layerwise":
        out = {}
        for n in names:
            flat = scores[n].flatten().double()
            k = max(1, round((1 - sparsity) * flat.numel()))
            out[n] = _top_k(flat, k, generator).reshape(scores[n].shape)
        return out
    flat = torch.cat([scores[n].flatten().double() for n in names])
    keep = _top_k(flat, max(1, round((1 - sparsity) * flat.numel())), generator)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].reshape(scores[n].shape)
        start += size
    return out


def _top_k(flat: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(flat.numel(), generator=generator)
    # stable sort of the permuted scores: among equal scores the random order decides
    order = torch.sort(flat[perm], descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[perm[order]] = True
    return keep


def make_mask(model: nn.Module, names: Sequence[str], source: str, sparsity: float, *, scope: str = "global",
              images: torch.Tensor | None = None, labels: torch.Tensor | None = None, seed: int = 0,
              synflow_rounds: int = 100, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """A bool mask of ``names`` at ``sparsity`` from a score ``source`` (see the module docstring)."""
    where = "make_mask()"
    _check_sparsity(sparsity, where)
    if source not in MASK_SOURCES:
        raise invalid_option("mask", where, f"one of {', '.join(MASK_SOURCES)} or a mask file", repr(source))
    if scope not in SCOPES:
        raise invalid_option("scope", where, "'global' or 'layerwise'", repr(scope))
    if isinstance(synflow_rounds, bool) or not isinstance(synflow_rounds, int) or synflow_rounds < 1:
        raise invalid_option("synflow_rounds", where, "an integer >= 1", synflow_rounds)
    if source != "synflow":
        return select_mask(mask_scores(model, names, source, images, labels, seed=seed, batch_size=batch_size),
                           sparsity, scope, seed)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in set(names)}
    for r in range(1, synflow_rounds + 1):
        density = (1 - sparsity) ** (r / synflow_rounds)
        scores = _synflow_scores(model, names, masks)
        # pruned weights score 0 already (masked to 0); push them below every live score
        scores = {n: torch.where(masks[n], scores[n], torch.full_like(scores[n], -1.0)) for n in names}
        masks = select_mask(scores, 1 - density, scope, seed + r)
    return masks


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all tensors of ``masks``."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def _parameter_key(key: str, params: Mapping[str, torch.Tensor]) -> str:
    """Map a mask-file key to a parameter name: strip ``module.``, and ``.weight_mask``/``._weight_mask``/``_mask``."""
    if key.startswith("module."):
        key = key[len("module.") :]
    for suffix, replacement in ((".weight_mask", ".weight"), ("._weight_mask", ".weight")):
        if key.endswith(suffix):
            return key[: -len(suffix)] + replacement
    if key.endswith("_mask"):
        base = key[: -len("_mask")]
        if base not in params and f"{base}.weight" in params:
            return f"{base}.weight"
        return base
    return key


def load_mask_file(path: PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read a mask file (a state dict of 0/1 or bool tensors, as ``cbs prune`` writes to ``mask.pt``).

    Keys are parameter names (``fc1.weight``, ``layer1.0.conv1.weight``); a ``module.`` prefix and the
    suffixes ``.weight_mask`` (torch pruning buffers), ``._weight_mask`` (WoodFisher) and ``_mask`` are
    accepted. Every key must name a parameter of ``model`` and every tensor must have its shape and
    only the values 0 and 1. Returns bool masks keyed by parameter name.

    Raises:
        DataNotFoundError: the file does not exist.
        CheckpointError: unreadable, not a dict of tensors, unknown key, wrong shape or non-0/1 values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"The mask file '{path}' does not exist. Pass --mask with the path of a mask.pt "
                                "(a state dict of 0/1 tensors) or one of " + ", ".join(MASK_SOURCES) + ".")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"The mask file '{path}' could not be read with torch.load(weights_only=True): "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"The mask file '{path}' must hold a non-empty dict of tensors (a state dict); "
                              f"found {type(raw).__name__}.")
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = _parameter_key(str(key), params)
        if name not in params:
            raise CheckpointError(f"The mask file '{path}' has key {key!r}, which is not a parameter of the "
                                  f"{type(model).__name__} (its parameters are e.g. {', '.join(list(params)[:4])}).")
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(f"The mask file '{path}': mask {key!r} has shape {tuple(value.shape)}, but "
                                  f"parameter {name!r} has shape {tuple(params[name].shape)}.")
        if value.dtype != torch.bool:
            bad = ~((value == 0) | (value == 1))
            if bool(bad.any()):
                raise CheckpointError(f"The mask file '{path}': mask {key!r} has values other than 0 and 1 "
                                      f"(e.g. {value[bad].flatten()[0].item()}).")
        if name in out:
            raise CheckpointError(f"The mask file '{path}' has two masks for parameter {name!r}.")
        out[name] = value.bool().clone()
    if not any(bool(m.any()) for m in out.values()):
        raise CheckpointError(f"The mask file '{path}' prunes every weight it covers (sparsity 1); a mask must keep "
                              "at least one weight, as --sparsity must be below 1.")
    return out
