"""The Python API of the whole pipeline: prune any model in one call.

    from engine.api import prune_model
    record = prune_model(model, train, test, sparsity=0.9)                      # the recommendation
    record = prune_model(model, train, test, sparsity=0.9, method="swap")      # plus your settings
    record = prune_model(model, train, test, sparsity=0.5, loss=my_loss, metric=my_metric, params="Linear")

``train`` and ``test`` are ``(inputs, targets)`` tensor pairs, map-style Datasets of ``(input, target)`` pairs or
DataLoaders. The model is pruned in place (masks attached; see :mod:`engine.masking`). What runs is what
``cbs prune`` runs with the same settings: the recommendation for this model and data (stages, BatchNorm
re-estimation between them, the held-out step search, the final re-estimation), then the keywords you give.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .losses import cross_entropy, top1_accuracy
from .pipeline import execute, prepare

__all__ = ["prune_model"]


def prune_model(model: nn.Module, train: Any, test: Any = None, *, sparsity: float, loss: Callable = cross_entropy,
                metric: Callable = top1_accuracy, params: str | list[str] | None = None,
                bn_reestimate: bool | None = None, bn_samples: int = 10000, out: str | None = None,
                cache: dict | None = None, **settings: Any) -> dict[str, Any]:
    """Prune ``model`` to ``sparsity`` with the recommended pipeline; the record (as ``cbs prune`` writes it).

    Parameters
    ----------
    model : any ``nn.Module`` mapping a batch of inputs to outputs.
    train, test : the data (``test`` may be None: no before/after measurement).
    sparsity : fraction of the selected weights removed, in [0, 1).
    loss : ``loss(outputs, targets) -> scalar`` (mean over the batch); metric : ``metric(outputs, targets)``.
    params : which parameters to prune (:func:`engine.params.select_parameters`: patterns or a list of names).
    bn_reestimate : re-estimate BatchNorm statistics between stages and at the end (default: the
        recommendation's: when the model has BatchNorm and no method is named).
    out : a folder to write ``record.json``, ``mask.pt`` and ``model.pt`` into (all at once).
    settings : any :class:`engine.config.PruneConfig` setting (``method``, ``stages``, ``fisher_samples``, ...),
        over the recommendation.
    """
    run = prepare(model, train, test, sparsity=sparsity, settings=settings, params=params, loss=loss, metric=metric,
                  bn_reestimate=bn_reestimate, bn_samples=bn_samples)
    return execute(run, out=out, cache=cache)
