"""Per-sample gradients for the empirical Fisher, with ``torch.func`` (vmap over grad).

For a model with prunable parameters θ (a subset of its parameters) and samples (x_i, y_i), row i of
``G`` is the gradient of the loss of sample i (or of the mean loss of mini-batch i of ``fisher_batch``
samples) with respect to θ, flattened. Then X = G/√N and F = XᵀX = GᵀG/N (DESIGN.md §1).

The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off): the
Fisher is the curvature of the function the pruned model will compute. ``batch_stats`` instead puts
BatchNorm on each row's batch statistics, for runs that re-estimate BatchNorm after pruning. Samples are processed in
chunks so that memory stays at O(chunk · |θ|) besides the output (N, |θ|), stored in float32 (the
rows are summed in float64 later, where it matters).

Two ways to the same rows (``strategy``): ``"vmap"`` (one vmapped ``grad`` over a chunk of rows) and
``"loop"`` (one ordinary backward pass per row of ``fisher_batch`` samples). They agree to float32
round-off. vmap wins for single-sample rows; for mini-batch rows of a convolutional network, vmap's
batching rule turns every row's weight gradient into a grouped convolution, and the plain loop is faster
(measured: docs/design.md, decision 19). ``"auto"`` picks the loop for rows of B >= 4 samples of a model with
a convolution, vmap otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .data import fast_layout
from .errors import invalid_option
from .evaluate import eval_mode
from .losses import LossFn, cross_entropy
from .progress import progress
from .sources import Drawn

__all__ = ["GradientSet", "per_sample_gradients", "STRATEGIES", "choose_strategy"]

#: ways of computing the rows (see the module docstring)
STRATEGIES = ("auto", "vmap", "loop")

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
    inputs: torch.Tensor | Drawn,
    targets: torch.Tensor | None = None,
    fisher_batch: int = 1,
    chunk_size: int = 256,
    loss: LossFn | str = "cross_entropy",
    show_progress: bool = False,
    strategy: str = "auto",
    batch_stats: bool = False,
) -> GradientSet:
    """Gradient rows of ``parameter_names`` for ``inputs`` (M, ...) and ``targets`` (M,), or for the samples
    of a :class:`engine.sources.Drawn` passed as ``inputs`` (fetched a chunk at a time, so only a chunk of
    samples is ever in memory besides the rows).

    ``loss(outputs, targets) -> scalar`` is the mean loss of a batch (default: cross-entropy on logits); it
    must be traceable by ``torch.func`` (any loss written with torch operations is).

    ``N = M // fisher_batch`` rows are returned (trailing samples that do not fill a mini-batch are
    dropped); row i is the gradient of the mean cross-entropy over samples [i·B, (i+1)·B).
    ``chunk_size`` is the number of *samples* vmapped at once, i.e. max(1, chunk_size // B) rows of B
    samples each (memory ~ chunk_size · activations, whatever B is).
    ``strategy``: "vmap", "loop" or "auto" (:func:`choose_strategy`); same rows up to float32 round-off.
    ``batch_stats``: BatchNorm layers normalise each row's mini-batch with its own statistics (training
    mode; the gradient then flows through the mean and variance too) instead of the running statistics,
    which are left exactly as they were. That is the local model of the loss *after* BatchNorm
    re-estimation, where a shift or rescaling of a channel that pruning causes is normalised away.
    Needs rows of ``fisher_batch`` >= 2 samples, and always takes the "loop" strategy.
    The model's train/eval mode is restored afterwards.
    """
    if fisher_batch < 1:
        raise invalid_option("fisher_batch", "per_sample_gradients()", "an integer >= 1", fisher_batch)
    if chunk_size < 1:
        raise invalid_option("chunk_size", "per_sample_gradients()", "an integer >= 1", chunk_size)
    if loss == "cross_entropy":
        loss = cross_entropy
    if not callable(loss):
        raise invalid_option("loss", "per_sample_gradients()", "a function loss(outputs, targets) -> scalar",
                             repr(loss))
    drawn = inputs if isinstance(inputs, Drawn) else None
    n_samples = len(drawn) if drawn is not None else inputs.shape[0]
    if strategy not in STRATEGIES:
        raise invalid_option("strategy", "per_sample_gradients()", f"one of {', '.join(STRATEGIES)}", repr(strategy))
    params = dict(model.named_parameters())
    missing = [n for n in parameter_names if n not in params]
    if missing:
        raise invalid_option("parameter_names", "per_sample_gradients()", "names of the model's parameters", missing)
    n_rows = n_samples // fisher_batch
    if n_rows < 1:
        raise invalid_option(
            "inputs", "per_sample_gradients()", f"at least fisher_batch = {fisher_batch} samples", n_samples
        )
    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in params.items() if n not in parameter_names}
    prunable = {n: params[n].detach() for n in parameter_names}
    def fetch(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows first:last as (rows, B, ...) inputs and (rows, B, ...) targets."""
        s, e = first * fisher_batch, last * fisher_batch
        xs, ys = drawn.rows(s, e) if drawn is not None else (inputs[s:e], targets[s:e])
        return xs.reshape(last - first, fisher_batch, *xs.shape[1:]), ys.reshape(last - first, fisher_batch,
                                                                                 *ys.shape[1:])

    def batch_loss(theta: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**frozen, **theta}, buffers), (xb,))
        return loss(out, yb)

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
    if strategy == "auto":
        strategy = choose_strategy(model, fisher_batch)
    if batch_stats and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if fisher_batch < 2:
            raise invalid_option("fisher_batch", "per_sample_gradients(batch_stats=True)", "an integer >= 2 "
                                 "(BatchNorm statistics of one sample are degenerate)", fisher_batch)
        strategy = "loop"  # running statistics are written in place, which vmap cannot batch
    wanted = [params[n] for n in parameter_names]
    requires = [p.requires_grad for p in wanted]
    try:
        with eval_mode(model, batch_stats):
            if strategy == "loop":
                for p in wanted:
                    p.requires_grad_(True)  # autograd.grad needs it (functional_call does not); restored below
                for i in progress(range(n_rows), total=n_rows, desc="gradients", enabled=show_progress):
                    xi, ti = fetch(i, i + 1)
                    with torch.enable_grad():
                        value = loss(model(fast_layout(xi[0])), ti[0])
                        grads = torch.autograd.grad(value, wanted)
                    for n, g in zip(parameter_names, grads):
                        out[n][i] = g.reshape(-1)
                    losses[i] = float(value.detach())
            else:
                rows_per_chunk = max(1, chunk_size // fisher_batch)
                starts = range(0, n_rows, rows_per_chunk)
                for s in progress(starts, total=len(starts), desc="gradients", enabled=show_progress):
                    e = min(n_rows, s + rows_per_chunk)
                    grads, values = grad_fn(prunable, *fetch(s, e))
                    for n in parameter_names:
                        out[n][s:e] = grads[n].reshape(e - s, -1).to(torch.float32)
                    losses[s:e] = values.detach().to(torch.float32)
    finally:
        for p, flag in zip(wanted, requires):
            p.requires_grad_(flag)
    return GradientSet(
        names=list(parameter_names),
        shapes=[prunable[n].shape for n in parameter_names],
        rows=out,
        losses=losses,
        fisher_batch=fisher_batch,
        buffer=buffer,
    )


def choose_strategy(model: nn.Module, fisher_batch: int) -> str:
    """The faster way for ``model`` and rows of ``fisher_batch`` samples: "loop" for B >= 4 in a model
    with a convolution, else "vmap" (timings in the module docstring)."""
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv and fisher_batch >= 4 else "vmap"
