"""Layer-wise reconstruction: the inputs each pruned layer sees on calibration data, as H = AᵀA/T (float64).

For a layer with weight W (d_out × d_in) and calibration inputs A (T × d_in; one row per token, pixel
position or sample), pruning row w of W to the support S with the refit v (v zero off S) changes the layer's
outputs on the calibration set by

    ‖A (v − w)‖² / T = (v − w)ᵀ H (v − w),        H = AᵀA / T,

so choosing S is exactly the block problem of :mod:`formulations.problem` with F = H, one problem per row,
all rows of a layer sharing H (OBC, SparseGPT, Wanda and ALPS solve this objective). A is never stored:
forward hooks accumulate AᵀA in float64 batch by batch.

How A is formed from a layer's input x:

* ``nn.Linear`` and GPT-2's ``Conv1D``: every leading index is a row, A = x.reshape(−1, d_in).
* ``nn.Conv2d`` (groups = 1): the unfolded patches (``torch.nn.functional.unfold`` with the layer's kernel,
  dilation, padding and stride), one row per output position; d_in = C_in · k_h · k_w in the order of
  ``weight.reshape(d_out, −1)``. Other convolutions (grouped, 1-d, 3-d, non-zero padding modes) are refused.

:func:`layer_hessians` runs the calibration batches once through the model and returns H for every layer;
:func:`layer_hessian` returns one layer's H and stops each forward pass at that layer (what the sequential
mode needs: layer l's inputs come from the already pruned layers before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import CBSError, invalid_option

__all__ = ["LayerHessian", "layer_hessians", "layer_hessian", "unfold_inputs", "check_unfoldable"]


@dataclass
class LayerHessian:
    """AᵀA accumulated over the calibration rows of one layer: ``gram`` (d_in, d_in) float64 and ``rows`` T.
    ``hessian`` is H = AᵀA / T."""

    name: str
    gram: np.ndarray
    rows: int = 0

    @property
    def hessian(self) -> np.ndarray:
        if self.rows == 0:
            raise CBSError(f"Layer '{self.name}' received no calibration inputs (it is not used by the model's "
                           "forward pass on the calibration data).")
        return self.gram / self.rows

    def add(self, a: torch.Tensor) -> None:
        a64 = a.detach().to(dtype=torch.float64, device="cpu")
        if not torch.isfinite(a64).all():
            raise CBSError(f"The inputs of layer '{self.name}' on the calibration data are not finite (NaN or inf "
                           "activations): check the model, its checkpoint and the calibration data.")
        self.gram += (a64.T @ a64).numpy()
        self.rows += a64.shape[0]


def _is_transposed(module: nn.Module) -> bool:
    from .hub import is_transposed_linear

    return is_transposed_linear(module)


def check_unfoldable(name: str, module: nn.Module) -> int:
    """d_in of a layer whose inputs this module can form, else a CBSError naming the layer and its type."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if _is_transposed(module):
        return int(module.weight.shape[0])
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise CBSError(f"Layer '{name}' ({module}) cannot be unfolded for the reconstruction objective: only "
                           "Conv2d with groups=1, zero padding and numeric padding is supported.")
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    raise CBSError(f"Layer '{name}' is a {type(module).__name__}: the reconstruction objective handles Linear, "
                   "Conv2d and GPT-2 Conv1D layers; use --objective fisher for it, or leave it out with --params.")


def unfold_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows A (T, d_in) of one input batch ``x`` of ``module`` (see the module docstring)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # (B, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    d_in = module.weight.shape[0] if _is_transposed(module) else module.weight.shape[1]
    return x.reshape(-1, d_in)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer it waits for has its inputs."""


def _forward(model: nn.Module, batch: Any) -> None:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    with torch.no_grad():
        try:
            model(inputs)
        except _Stop:
            pass


def layer_hessians(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batches: Iterable[Any],
                   stop_after: str | None = None) -> dict[str, LayerHessian]:
    """AᵀA and T of every ``(name, module)`` over the calibration ``batches`` (each an input tensor or an
    ``(inputs, targets)`` pair); with ``stop_after`` each forward pass ends once that layer has its input."""
    if not modules:
        raise invalid_option("modules", "layer_hessians()", "at least one (name, module)", "none")
    grams: dict[str, LayerHessian] = {}
    for name, module in modules:
        d_in = check_unfoldable(name, module)
        grams[name] = LayerHessian(name, np.zeros((d_in, d_in)))
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            grams[name].add(unfold_inputs(module, args[0]))
            if name == stop_after:
                raise _Stop

        return hook

    try:
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                _forward(model, batch)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return grams


def layer_hessian(model: nn.Module, name: str, module: nn.Module, batches: Iterable[Any]) -> LayerHessian:
    """One layer's AᵀA and T; each forward pass stops at the layer (the rest of the model is not run)."""
    return layer_hessians(model, [(name, module)], batches, stop_after=name)[name]
