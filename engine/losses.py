"""Losses of a model on fixed samples, used while pruning: the mean training loss, the per-block losses that
``cbs`` scores masks with (running only the suffix of the forward pass), and the step search.

A loss is any ``loss(outputs, targets) -> scalar tensor``, the mean over the batch (default
:func:`cross_entropy` on logits); a metric is ``metric(outputs, targets) -> number``, the mean over the batch
(default :func:`top1_accuracy`, in percent). Means over several batches weight each batch by its samples.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .blocks import Block
from .data import fast_layout
from .evaluate import eval_mode
from .masking import resolve

__all__ = ["LossFn", "cross_entropy", "top1_accuracy", "batch_loss_sum", "mean_loss", "PrefixLoss", "BlockLoss",
           "STEPS", "search_steps", "step_search", "write_weights"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, C) against class indices (B,) (the default loss)."""
    return nn.functional.cross_entropy(outputs, targets)


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Percent of rows whose largest logit is the target (the default metric)."""
    return 100.0 * float((outputs.argmax(dim=-1) == targets).float().mean())


def batch_loss_sum(loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The loss summed over the batch (the default cross-entropy summed exactly, others as mean × rows)."""
    if loss is cross_entropy:
        return float(nn.functional.cross_entropy(outputs, targets, reduction="sum"))
    return float(loss(outputs, targets)) * outputs.shape[0]


def _loss_step(batch: int, batch_stats: bool = False) -> int:
    """Samples per forward pass of the training losses (:func:`mean_loss`, :class:`PrefixLoss`: the same
    batches, so their losses agree bit for bit). With running statistics the batch size does not change the
    loss, and on the CPU batches of a few hundred stay in cache; with batch statistics it defines them."""
    return batch if batch_stats else min(batch, 256)


def mean_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 2000,
              batch_stats: bool = False, loss: LossFn = cross_entropy) -> float:
    """Mean ``loss`` of ``model`` (eval mode, no gradients) on ``inputs``.

    ``batch_stats``: BatchNorm layers normalise with the statistics of each batch of ``inputs`` (training mode)
    instead of their running statistics, which are left exactly as they were: the loss the weights will have
    once BatchNorm is re-estimated."""
    total, count = 0.0, 0
    step = _loss_step(batch, batch_stats)
    with eval_mode(model, batch_stats), torch.no_grad():
        for s in range(0, inputs.shape[0], step):
            out = model(fast_layout(inputs[s : s + step]))
            total += batch_loss_sum(loss, out, targets[s : s + step])
            count += out.shape[0]
    return total / max(count, 1)


class PrefixLoss:
    """The eval-mode mean loss of ``model`` on fixed ``inputs``, keeping the activations that enter one part of
    the model's forward chain (:func:`engine.models.forward_chain`) so that a loss after changing only the
    parameters of that part and later ones runs the suffix alone.

    One cache slot per stage of selection, shared by the blocks' ``evaluate`` callbacks: while blocks are
    selected the model's weights are those of the stage's start (each call restores what it changed), so the
    activations entering a part are the same for every call that changes nothing before it. Batches and
    per-batch operations are those of :func:`mean_loss`, so the loss equals the full forward pass's bit for
    bit. Models without a chain run the whole forward pass.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 2000,
                 loss: LossFn = cross_entropy) -> None:
        from .models import forward_chain

        self.model, self.inputs, self.targets, self.step = model, inputs, targets, _loss_step(batch)
        self.batch, self.loss = batch, loss
        self.chain = forward_chain(model)
        self.slot: tuple[int, list[torch.Tensor]] | None = None

    def first_part(self, parameters: list[torch.Tensor]) -> int:
        """Index of the first part that reads any of ``parameters`` (0 without a chain: the whole pass)."""
        if self.chain is None:
            return 0
        ids = {id(p) for p in parameters}
        return next((i for i, (_, owned) in enumerate(self.chain) if owned & ids), 0)

    def __call__(self, part: int) -> float:
        """Mean loss, parts before ``part`` taken from the cache (computed on first use)."""
        if self.chain is None or part == 0:
            return mean_loss(self.model, self.inputs, self.targets, self.batch, loss=self.loss)
        total, count = 0.0, 0
        with eval_mode(self.model), torch.no_grad():
            if self.slot is None or self.slot[0] != part:
                self.slot = None  # free the old slot before filling the new one
                entering = []
                for s in range(0, self.inputs.shape[0], self.step):
                    h = fast_layout(self.inputs[s : s + self.step])
                    for fn, _ in self.chain[:part]:
                        h = fn(h)
                    entering.append(h)
                self.slot = (part, entering)
            for s, h in zip(range(0, self.inputs.shape[0], self.step), self.slot[1]):
                for fn, _ in self.chain[part:]:
                    h = fn(h)
                total += batch_loss_sum(self.loss, h, self.targets[s : s + self.step])
                count += h.shape[0]
        return total / max(count, 1)


class BlockLoss:
    """``evaluate(support) -> training loss`` of the model with one block's weights masked.

    ``support`` is over the block's *alive* weights (``positions``: their indices in the block's flat vector;
    the others are already pruned and stay zero). Without ``problem`` the kept weights keep their values (the
    paper's choice: no update while selecting); with ``problem`` they get the CBS-U update first. The block's
    weights are written in place and restored before returning (also on error).
    """

    def __init__(self, model: nn.Module, block: Block, positions: np.ndarray, prefix: PrefixLoss,
                 problem=None) -> None:
        self.model, self.block, self.problem, self.prefix = model, block, problem, prefix
        self.positions = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        self.params = {name: getattr(*resolve(model, name)) for name, _, _, _ in block.segments}
        self.part = prefix.first_part(list(self.params.values()))

    def __call__(self, support: np.ndarray) -> float:
        from .update import batched_update

        mask = torch.zeros(self.block.n, dtype=torch.bool)
        mask[self.positions] = torch.from_numpy(np.asarray(support, dtype=bool))
        values = {name: p.data.view(-1) for name, p in self.params.items()}
        saved = self.block.gather_values(values).clone()
        with torch.no_grad():
            try:
                new = saved.clone()
                if self.problem is not None:
                    new = torch.zeros(self.block.n, dtype=torch.float64)
                    new[self.positions] = torch.from_numpy(batched_update([self.problem], [support])[0].weights)
                self.block.scatter(values, new.to(saved.dtype) * mask.to(saved.dtype))
                return self.prefix(self.part)
            finally:
                self.block.scatter(values, saved)


#: steps tried by the step search, largest first (τ = 1 is the plain update, τ = 0 the masked weights)
STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


def search_steps(loss: Callable[[float], float], steps: tuple[float, ...] = STEPS) -> tuple[float, float, int]:
    """The step of lowest ``loss`` among those tried; (τ, loss(τ), number of losses computed).

    ``steps`` run from the full update down to τ = 0 (the masked weights). They are tried in that order until
    one is no lower than the one before it (the loss along the segment has then passed its first minimum on
    the grid), and τ = steps[-1] is always tried as well. So the answer equals the minimum over the whole grid
    whenever the loss along τ has a single minimum there, and it is never above the masked weights' loss."""
    best_tau, best_value = steps[0], loss(steps[0])
    previous, count = best_value, 1
    for tau in steps[1:-1]:
        value = loss(tau)
        count += 1
        if value < best_value - 1e-12:
            best_tau, best_value = tau, value
        if value >= previous - 1e-12:
            break
        previous = value
    if steps[-1] != steps[0]:
        value = loss(steps[-1])
        count += 1
        if value < best_value - 1e-12:
            best_tau, best_value = steps[-1], value
    return best_tau, best_value, count


def write_weights(model: nn.Module, names: list[str], flat: dict[str, torch.Tensor]) -> None:
    """Copy flat weight vectors into the (unmasked) parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].view(-1).copy_(flat[n].to(params[n].dtype))


def step_search(model: nn.Module, names: list[str], masked: dict[str, torch.Tensor],
                updated: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                batch_stats: bool = False, loss: LossFn = cross_entropy) -> tuple[float, float]:
    """The step τ of :func:`search_steps` over STEPS on the training loss at masked + τ (updated − masked);
    (τ, loss). Both end points have the same support, so every candidate has the stage's sparsity. The
    model's weights are restored before returning."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().reshape(-1).clone() for n in names}

    def at(tau: float) -> float:
        write_weights(model, names, {n: masked[n] + tau * (updated[n] - masked[n]) for n in names})
        return mean_loss(model, inputs, targets, batch_stats=batch_stats, loss=loss)

    try:
        tau, value, _ = search_steps(at)
    finally:
        write_weights(model, names, saved)
    return tau, value
