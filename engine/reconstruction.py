"""``--objective reconstruction`` in the pipeline: checks before any work, and the run as a PruneReport.

The work itself is :func:`engine.layerwise.prune_layerwise`; this module draws the calibration samples from the
training data (``calibration_samples``, seeded), maps the run's settings onto it, and turns its per-layer
records into the :class:`~engine.config.BlockRecord` s every record holds (one per layer: n = d_out·d_in weights,
k kept, Σ E_i, Σ bounds, gap; ``extra`` has the reconstruction error, the method's own error for SparseGPT, the
share of rows proven optimal and λ).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from .config import BlockRecord, PruneConfig, PruneReport, StageRecord
from .errors import invalid_option
from .layerwise import check_layers, prune_layerwise
from .resume import LayerProgress
from .sources import Samples

__all__ = ["RECONSTRUCTION_METHOD", "WARM_ALLOCATION", "check_reconstruction_inputs", "prune_reconstruction",
           "warm_config", "warm_stage"]

#: the method the recommendation takes with --objective reconstruction, unstructured or N:M
#: (docs/layerwise.md: the ALPS-style ADMM per row, then the refit, had the lowest summed reconstruction error
#: on charlm at every sparsity and pattern measured, below OBC's greedy OBS and SparseGPT with the refit)
RECONSTRUCTION_METHOD = "admm"

#: the budget across layers of a warm start (``warm_start``): ResNet20 at 0.7, seed 0, layer-wise alone gave 90.25
#: with the loss-curve knapsack against 89.58 with the same sparsity in every layer (docs/results.md)
WARM_ALLOCATION = "loss_curve"

#: calibration samples per forward pass
_BATCH = 32


def check_reconstruction_inputs(model: nn.Module, names: list[str], n_train: int, config: PruneConfig) -> None:
    """Everything that can be wrong before the work: the calibration count, then
    :func:`engine.layerwise.check_layers` (the layers, the method, the pattern against the allocation and
    every layer's d_in)."""
    if config.calibration_samples > n_train:
        raise invalid_option("calibration_samples", "cbs prune", f"at most the {n_train} training samples",
                             config.calibration_samples)
    check_layers(model, names, pattern=config.pattern, allocation=config.allocation, method=config.method,
                 solver_params=config.solver_params, where="cbs prune", names_argument="params")


def prune_reconstruction(model: nn.Module, names: list[str], train: Samples, config: PruneConfig, *,
                         resume_from: LayerProgress | None = None,
                         on_progress: Callable[[LayerProgress], None] | None = None) -> PruneReport:
    """Layer-wise reconstruction pruning of ``names`` in place; the report the Fisher path would give.
    ``resume_from``, ``on_progress``: as :func:`engine.layerwise.prune_layerwise`'s (a resumed run's seconds
    include those of the layers done before)."""
    start = time.perf_counter()
    drawn = train.draw(config.calibration_samples, config.seed, "calibration")
    calibration = [x for x, _ in drawn.batches(_BATCH)]
    masks, layers = prune_layerwise(
        model, names, calibration, sparsity=None if config.pattern is not None else config.sparsity,
        pattern=config.pattern, method=config.method,
        sequential=config.sequential, time_limit=config.time_limit, solver_params=config.solver_params or None,
        refit=config.applies_update, allocation=config.allocation, certify_time=config.certify_time,
        executor=config.executor, workers=config.workers, ray_address=config.ray_address,
        resume_from=resume_from, on_progress=on_progress)
    blocks = [BlockRecord(label=r.name, n=r.d_out * r.d_in, k=r.kept, objective=r.objective, bound=r.bound,
                          gap=r.gap, status="optimal" if r.rows_proven == 1.0 else "feasible",
                          termination="completed", solve_seconds=r.seconds,
                          extra={"reconstruction_error": r.error, "method_error": r.method_error,
                                 "rows_proven": r.rows_proven, "d_out": r.d_out, "d_in": r.d_in, **r.extra})
              for r in layers]
    total = sum(int(m.numel()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    seconds = time.perf_counter() - start + sum(r.seconds for r in (resume_from.records if resume_from else []))
    return PruneReport(config=config.to_dict(), blocks=blocks, n_total=total, n_keep=kept,
                       achieved_sparsity=1.0 - kept / total, fisher_seconds=0.0, select_seconds=seconds,
                       update_seconds=0.0, prune_seconds=seconds,
                       masks={k: v.to(torch.bool) for k, v in masks.items()})


def warm_config(config: PruneConfig) -> PruneConfig:
    """The settings of a Fisher run's layer-wise first stage (``config.warm_start`` = s₀): reconstruction to s₀
    with :data:`RECONSTRUCTION_METHOD` and the refit, the :data:`WARM_ALLOCATION` budget across layers, the run's
    calibration samples, sequential setting, seed, solver limits and executor."""
    if not isinstance(config, PruneConfig) or config.warm_start is None:
        raise invalid_option("config", "warm_config()", "a PruneConfig with a warm_start",
                             repr(getattr(config, "warm_start", type(config).__name__)))
    return replace(config, objective="reconstruction", sparsity=config.warm_start, warm_start=None, stages=1,
                   method=RECONSTRUCTION_METHOD, update=True, allocation=WARM_ALLOCATION, solver_params={},
                   pattern=None, compensate=(), certify=None)


def warm_stage(run):
    """Stage 1 of a warm-started Fisher run (:func:`engine.pruner.prune` with ``warm_start``): layer-wise
    reconstruction of ``run.names`` to ``run.config.warm_start`` (:func:`warm_config`), as a :class:`~engine.stage.StageOutcome`
    whose record has no Fisher objective (``objective_total`` None; the summed reconstruction objective and
    error are in ``extra``). The layers are pruned in the model itself; the outcome's values are its weights."""
    from .stage import Run, StageOutcome

    if not isinstance(run, Run):
        raise invalid_option("run", "warm_stage()", "an engine.stage.Run", type(run).__name__)
    config = warm_config(run.config)
    report = prune_reconstruction(run.model, list(run.names), run.train, config)
    params = dict(run.model.named_parameters())
    values = {n: params[n].detach().reshape(-1).clone() for n in run.moved}
    alive = {n: report.masks[n].reshape(-1).clone() for n in run.names}
    seconds = report.prune_seconds
    summary = {"method": config.method_name, "allocation": config.allocation,
               "calibration_samples": config.calibration_samples,
               "reconstruction_objective": float(sum(b.objective for b in report.blocks)),
               "reconstruction_error": float(sum(b.extra["reconstruction_error"] for b in report.blocks))}
    record = StageRecord(stage=1, sparsity=float(config.sparsity), n_keep=report.n_keep, objective_total=None,
                         fisher_seconds=0.0, select_seconds=seconds, update_seconds=0.0,
                         extra={"warm_start": summary})
    return StageOutcome(record, report.blocks, [], values, alive, 0.0, seconds, 0.0, seconds)
