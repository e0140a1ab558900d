"""Per-sample gradients for the empirical Fisher, with ``torch.func`` (vmap over grad).

For a model with prunable parameters θ (a subset of its parameters) and samples (x_i, y_i), row i of
``G`` is the gradient of the loss of sample i (or of the mean loss of mini-batch i of ``fisher_batch``
samples) with respect to θ, flattened. Then X = G/√N and F = XᵀX = GᵀG/N (DESIGN.md §1).

The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off): the
Fisher is the curvature of the function the pruned model will compute. Samples are processed in
chunks so that memory stays at O(chunk · |θ|) besides the output (N, |θ|), stored in float32 (the
rows are summed in float64 later, where it matters).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import invalid_option
from .progress import progress

__all__ = ["GradientSet", "per_sample_gradients"]

log = logging.getLogger(__name__)


@dataclass
class GradientSet:
    """Gradient rows of the prunable parameters.

    Attributes
    ----------
    names : parameter names, in model order.
    shapes : their shapes.
    rows : dict name -> (N, numel) float32 tensor, row i = gradient of loss i w.r.t. that parameter.
        Each is a column slice (a view) of ``buffer``.
    buffer : (N, Σ numel) float32, every parameter's rows side by side in ``names`` order: a block that
        spans all of them (``block_mode="whole"``) uses it without a copy.
    losses : (N,) float32, the loss of each row's sample or mini-batch at the current weights.
    fisher_batch : samples averaged per row.
    """

    names: list[str]
    shapes: list[torch.Size]
    rows: dict[str, torch.Tensor]
    losses: torch.Tensor
    fisher_batch: int
    buffer: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        """N, the number of gradient rows."""
        return int(self.losses.numel())

    def matrix(self, names: list[str] | None = None) -> torch.Tensor:
        """The rows of several parameters side by side, (N, Σ numel), float32 (a copy)."""
        names = self.names if names is None else names
        return torch.cat([self.rows[n] for n in names], dim=1)


def per_sample_gradients(
    model: nn.Module,
    parameter_names: list[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    fisher_batch: int = 1,
    chunk_size: int = 256,
    loss: str = "cross_entropy",
    show_progress: bool = False,
) -> GradientSet:
    """Gradient rows of ``parameter_names`` for ``inputs`` (M, ...) and ``targets`` (M,).

    ``N = M // fisher_batch`` rows are returned (trailing samples that do not fill a mini-batch are
    dropped); row i is the gradient of the mean cross-entropy over samples [i·B, (i+1)·B).
    ``chunk_size`` is the number of *samples* vmapped at once, i.e. max(1, chunk_size // B) rows of B
    samples each (memory ~ chunk_size · activations, whatever B is).
    The model's train/eval mode is restored afterwards.
    """
    if fisher_batch < 1:
        raise invalid_option("fisher_batch", "per_sample_gradients()", "an integer >= 1", fisher_batch)
    if chunk_size < 1:
        raise invalid_option("chunk_size", "per_sample_gradients()", "an integer >= 1", chunk_size)
    if loss != "cross_entropy":
        raise invalid_option("loss", "per_sample_gradients()", "'cross_entropy'", repr(loss))
    params = dict(model.named_parameters())
    missing = [n for n in parameter_names if n not in params]
    if missing:
        raise invalid_option("parameter_names", "per_sample_gradients()", "names of the model's parameters", missing)
    n_rows = inputs.shape[0] // fisher_batch
    if n_rows < 1:
        raise invalid_option(
            "inputs", "per_sample_gradients()", f"at least fisher_batch = {fisher_batch} samples", inputs.shape[0]
        )
    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in params.items() if n not in parameter_names}
    prunable = {n: params[n].detach() for n in parameter_names}
    x = inputs[: n_rows * fisher_batch].reshape(n_rows, fisher_batch, *inputs.shape[1:])
    t = targets[: n_rows * fisher_batch].reshape(n_rows, fisher_batch)

    def batch_loss(theta: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**frozen, **theta}, buffers), (xb,))
        return nn.functional.cross_entropy(out, yb)

    # grad w.r.t. theta returns (gradients, loss) with has_aux; vmap over the rows of one chunk
    def row(theta, xb, yb):
        value = batch_loss(theta, xb, yb)
        return value, value

    grad_fn = vmap(grad(row, has_aux=True), in_dims=(None, 0, 0))
    # one (N, Σ numel) buffer with per-parameter column views: a whole-network block needs no second copy
    sizes = [prunable[n].numel() for n in parameter_names]
    buffer = torch.empty((n_rows, sum(sizes)), dtype=torch.float32)
    out, offset = {}, 0
    for n, size in zip(parameter_names, sizes):
        out[n] = buffer[:, offset : offset + size]
        offset += size
    losses = torch.empty(n_rows, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        rows_per_chunk = max(1, chunk_size // fisher_batch)
        starts = range(0, n_rows, rows_per_chunk)
        for s in progress(starts, total=len(starts), desc="gradients", enabled=show_progress):
            e = min(n_rows, s + rows_per_chunk)
            grads, values = grad_fn(prunable, x[s:e], t[s:e])
            for n in parameter_names:
                out[n][s:e] = grads[n].reshape(e - s, -1).to(torch.float32)
            losses[s:e] = values.detach().to(torch.float32)
    finally:
        model.train(was_training)
    return GradientSet(
        names=list(parameter_names),
        shapes=[prunable[n].shape for n in parameter_names],
        rows=out,
        losses=losses,
        fisher_batch=fisher_batch,
        buffer=buffer,
    )
