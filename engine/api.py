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

from .errors import invalid_option
from .losses import cross_entropy, top1_accuracy
from .pipeline import execute, prepare
from .settings import option

__all__ = ["prune_model"]


def prune_model(model: nn.Module, train: Any, test: Any = None, *, sparsity: float, loss: Callable = cross_entropy,
                metric: Callable = top1_accuracy, params: str | list[str] | None = None,
                bn_reestimate: bool | None = None, bn_samples: int = option("bn_samples").default,
                stage_test: bool = option("stage_test").default,
                out: str | None = None, cache: dict | None = None, resume: bool = False,
                **settings: Any) -> dict[str, Any]:
    """Prune ``model`` to ``sparsity`` with the recommended pipeline; the record (as ``cbs prune`` writes it).

    Parameters
    ----------
    model : any ``nn.Module`` mapping a batch of inputs to outputs.
    train, test : the data (``test`` may be None: no before/after measurement).
    sparsity : fraction of the selected weights removed, in [0, 1).
    loss : ``loss(outputs, targets) -> scalar`` (mean over the batch); metric : ``metric(outputs, targets)``.
    params : which parameters to prune (:func:`engine.params.select_parameters`: patterns or a list of names).
    bn_reestimate : re-estimate BatchNorm statistics between stages and at the end (default: the
        recommendation's: when the model has BatchNorm and no method is named); bn_samples : training samples
        of each re-estimation (two augmented copies each for image batches).
    stage_test : measure ``test`` after every stage of a multi-stage run (the record's per-stage accuracy; one
        test pass a stage, nothing else changes).
    out : a folder to write ``record.json``, ``mask.pt`` and ``model.pt`` into (all at once); a multi-stage or
        layer-wise run also replaces it with a checkpoint after every stage or layer (:mod:`engine.resume`).
    resume : continue the interrupted run in ``out`` (a new or empty ``out`` starts afresh, a finished one returns
        its record and puts its result into ``model``); ``model`` must be the dense model the run started from
        and every setting the same, else it is refused naming the difference. The same result, bit for bit.
    settings : any :class:`engine.config.PruneConfig` setting (``method``, ``stages``, ``fisher_samples``, ...),
        over the recommendation.
    """
    if not isinstance(resume, bool):
        raise invalid_option("resume", "prune_model()", "True or False", repr(resume))
    if resume and out is None:
        raise invalid_option("resume", "prune_model()", "False without out (a run to resume lives in out)", True)
    run = prepare(model, train, test, sparsity=sparsity, settings=settings, params=params, loss=loss, metric=metric,
                  bn_reestimate=bn_reestimate, bn_samples=bn_samples, stage_test=stage_test)
    if not resume:
        return execute(run, out=out, cache=cache)
    from .outdir import locked
    from .resume import check_folder

    folder = check_folder(out, "prune_model()", resume=True)
    with locked(folder, "prune_model()"):  # one run per folder
        return execute(run, out=str(folder), cache=cache, resume=True)
