"""One-shot combinatorial OBS pruning of a torch model (DESIGN.md §1-3): the driver.

    data → gradients → blocks → budget → select → update → step     (engine.stage, once per stage)
      → BatchNorm re-estimation between stages (the caller's ``on_stage``)
      → masks and weights written into the model, all or nothing    (engine.masking)

Python API::

    from engine.pruner import PruneConfig, prune
    report = prune(model, names, train, PruneConfig(sparsity=0.9, method="cbs"))
    report.blocks[0]  # n, k, objective, bound, gap, status, termination, ...

``train`` is a pair of tensors ``(inputs, targets)``, a map-style ``Dataset`` of ``(input, target)`` pairs or a
``DataLoader`` (:mod:`engine.sources`); ``loss(outputs, targets) -> scalar`` defaults to cross-entropy. For the
whole recommended pipeline around this (evaluation, BatchNorm, records) see :func:`engine.api.prune_model`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from .blocks import make_blocks
from .config import BlockRecord, PruneConfig, PruneReport, StageRecord, stage_schedule
from .errors import InvalidOptionError, describe_value, invalid_option
from .losses import LossFn, cross_entropy, write_weights
from .masking import apply_pruning
from .progress import get_logger, progress
from .reconstruction import check_reconstruction_inputs, warm_config, warm_stage
from .resume import StageProgress, check_callback
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver
from .sources import as_samples
from .stage import Run, run_stage
from .variants import compensating_parameters

__all__ = ["PruneConfig", "PruneReport", "BlockRecord", "StageRecord", "prune", "check_prune_inputs",
           "stage_schedule"]

log = get_logger(__name__)


def check_prune_inputs(model: nn.Module, parameter_names: list[str], n_train: int, config: PruneConfig,
                       transposed: frozenset[str] = frozenset()) -> SubsetSolver:
    """Every check :func:`prune` makes before any work, on its own (callers that load data first run it before
    evaluating anything): the config type, the parameter names, the method (and its solver being installed),
    the sample counts against ``n_train`` training samples, and the method's largest block. Raises
    :class:`InvalidOptionError` naming the argument; returns the solver."""
    if not isinstance(config, PruneConfig):
        raise invalid_option("config", "prune()", "a PruneConfig", type(config).__name__)
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise invalid_option("n_train", "check_prune_inputs()", "an integer >= 1 (the training samples)", repr(n_train))
    params = dict(model.named_parameters())
    missing = [n for n in parameter_names if n not in params]
    if missing or not parameter_names:
        raise invalid_option("parameter_names", "prune()", "a non-empty list of the model's parameter names", missing)
    comp = compensating_parameters(model, parameter_names, config.compensate)
    bad = [n for n in comp if n not in params or n in parameter_names]
    if bad or len(set(comp)) != len(comp):
        raise invalid_option("compensate", "prune()", "distinct parameter names of the model outside parameter_names",
                             bad or list(comp))
    solver = get_solver(config.method, **config.solver_params)
    if hasattr(solver, "ensure_available"):
        solver.ensure_available()
    if config.needs_gradients:
        rows = config.fisher_samples * config.fisher_batch
        if rows > n_train:
            raise invalid_option("fisher_samples", "prune()", f"fisher_samples x fisher_batch at most the {n_train} "
                                 "training samples", f"{config.fisher_samples} x {config.fisher_batch} = {rows}")
        if config.loss_samples is not None:
            if config.loss_samples > n_train:
                raise invalid_option("loss_samples", "prune()", f"at most the {n_train} training samples",
                                     config.loss_samples)
            if config.holdout_loss and rows + config.loss_samples > n_train:
                raise invalid_option("loss_samples", "prune()", f"at most the {n_train - rows} training samples "
                                     f"left after the {rows} Fisher samples (holdout_loss)", config.loss_samples)
    if config.warm_start is not None:  # the layer-wise first stage: its layers and calibration count
        check_reconstruction_inputs(model, list(parameter_names), n_train, warm_config(config))
    if config.needs_gradients:
        _check_memory(config, sum(params[n].numel() for n in parameter_names))
    from .executor import make_executor

    make_executor(config.executor, config.workers, config.ray_address, "prune()")  # Ray joined (or refused) now
    cap = solver.capabilities
    if config.pattern is not None:
        _check_pattern_geometry(config, {n: params[n].shape for n in parameter_names}, transposed, solver)
    largest = max(b.n for b in make_blocks(parameter_names, [params[n].shape for n in parameter_names],
                                           config.block_mode, config.block_size, transposed))
    if cap.max_size is not None and largest > cap.max_size:
        raise InvalidOptionError(
            f"Method '{solver.name}' accepts blocks of at most {cap.max_size} weights; the largest block has "
            f"{largest}. Use --block-mode chunk --block-size B (B <= {cap.max_size}) or another method."
        )
    return solver


def _check_pattern_geometry(config: PruneConfig, shapes: dict[str, torch.Size], transposed: frozenset[str],
                            solver: SubsetSolver) -> None:
    """Under an N:M pattern every group of M consecutive weights of a block must lie in one row (a unit's
    inputs): M divides every row length, a transposed weight (GPT-2 ``Conv1D``) is split by rows
    (``block_mode`` 'row'), a chunk holds whole groups; and the method honours patterns."""
    N, M = config.pattern
    where, shown = "prune()", f"{N}:{M}"
    if not getattr(solver.capabilities, "patterns", False):
        from .solvers.registry import pattern_solvers

        raise invalid_option("method", where, f"a solver that honours N:M patterns ({', '.join(pattern_solvers())})",
                             repr(solver.name))
    for name, shape in shapes.items():
        row = shape[0] if name in transposed else (math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape))
        if row % M:
            raise invalid_option("pattern", where, f"N:M with M dividing every pruned row's length ({name}: {row})",
                                 shown)
        if name in transposed and config.block_mode != "row":
            raise invalid_option("block_mode", where, f"'row' with a pattern when a pruned weight is stored "
                                 f"transposed ({name})", repr(config.block_mode))
    if config.block_mode == "chunk" and config.block_size % M:
        raise invalid_option("block_size", where, f"a multiple of M = {M} with pattern {shown}", config.block_size)


def _check_memory(config: PruneConfig, n_weights: int) -> None:
    """The gradient rows (N × n float32, twice over when blocks copy their columns out) must fit in this
    machine's memory: say so before any work instead of failing in the middle."""
    import os

    copies = 1 if config.block_mode == "whole" else 2
    needed = config.fisher_samples * n_weights * 4 * copies
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported on this platform: nothing to check against
        return
    if needed > 0.8 * physical:
        raise invalid_option("fisher_samples", "prune()", f"small enough for the gradient rows to fit in memory: "
                             f"{config.fisher_samples} rows x {n_weights:,} weights x 4 bytes"
                             f"{' x 2 (block copies)' if copies == 2 else ''} = {needed / 2**30:.1f} GiB, this "
                             f"machine has {physical / 2**30:.1f} GiB; use fewer samples or prune fewer parameters "
                             "(--params)", config.fisher_samples)


def prune(
    model: nn.Module,
    parameter_names: list[str],
    train: Any,
    config: PruneConfig,
    *,
    loss: LossFn = cross_entropy,
    transposed: frozenset[str] = frozenset(),
    on_block: Callable[[BlockRecord], None] | None = None,
    on_stage: Callable[[StageRecord, nn.Module], None] | None = None,
    cache: dict | None = None,
    resume_from: StageProgress | None = None,
    on_progress: Callable[[StageProgress], None] | None = None,
) -> PruneReport:
    """Prune ``parameter_names`` of ``model`` in one shot (or in ``config.stages`` stages); the model is edited
    in place, all or nothing (on an error it is restored).

    Parameters
    ----------
    model : a torch module (evaluated in eval mode for gradients and losses).
    parameter_names : the prunable parameters (e.g. from :func:`engine.params.select_parameters`).
    train : training data (tensors, Dataset or DataLoader) from which the Fisher samples (and the loss
        samples) are drawn with ``config.seed``.
    config : :class:`PruneConfig`.
    loss : ``loss(outputs, targets) -> scalar``, the mean over a batch.
    transposed : parameters stored (in, out) (GPT-2's Conv1D): their row blocks are columns.
    on_block : called with each finished block's record of the last stage.
    on_stage : called after every stage but the last with its record and the model, whose weights are then
        the stage's (pruned weights zero, no masks yet): e.g. to re-estimate BatchNorm or log accuracy.
    cache : a dict the caller keeps between calls (sweeps): the first stage's gradients and block problems are
        stored there and reused by later calls with the same weights (a sha1 of their bytes), data, samples and
        Fisher settings, and so is the update of every set of supports already solved.
    resume_from : a :class:`engine.resume.StageProgress` of this run (its checkpoint): the stages it has done are
        not run again; the model's state after them (weights, BatchNorm buffers), the masks, stage records and
        timings come from it. ``model`` is still the model the run started from (restored on an error).
    on_progress : called after every stage but the last, after ``on_stage``, with the run's
        :class:`~engine.resume.StageProgress` (e.g. to write a checkpoint, :mod:`engine.resume`).
    """
    train = as_samples(train, "train")
    solver = check_prune_inputs(model, parameter_names, len(train), config, transposed)
    if isinstance(config.compensate, str):
        config = replace(config, compensate=compensating_parameters(model, parameter_names, config.compensate))
    run = Run(model, list(parameter_names), train, config, solver, loss, frozenset(transposed), cache)
    params = dict(model.named_parameters())
    original = {n: params[n].detach().clone() for n in run.moved}
    alive = {n: torch.ones(params[n].numel(), dtype=torch.bool) for n in parameter_names}
    schedule = stage_schedule(config)
    stages: list[StageRecord] = []
    totals = {"fisher": 0.0, "select": 0.0, "update": 0.0, "prune": 0.0}
    check_callback(on_progress, "on_progress", "prune()", "a StageProgress")
    if resume_from is not None and not isinstance(resume_from, StageProgress):
        raise invalid_option("resume_from", "prune()", "None or a StageProgress", describe_value(resume_from))
    first = 0
    try:
        if resume_from is not None:  # the stages done: their state into the model, the rest from the checkpoint
            first, alive, stages, totals = resume_from.restore(model, list(parameter_names), len(schedule))
        stages_bar = progress(enumerate(schedule), total=len(schedule), desc="stages",
                              enabled=config.progress if len(schedule) > 1 else False)
        for t, target in stages_bar:
            if t < first:
                continue
            if t == 0 and config.warm_start is not None:
                outcome = warm_stage(run)  # to schedule[0], the warm start
            else:
                outcome = run_stage(run, t, target, alive)
            stages.append(outcome.record)
            for key in totals:
                totals[key] += getattr(outcome, key)
            if t == len(schedule) - 1:
                break
            write_weights(model, run.moved, outcome.values)
            alive = outcome.alive
            if on_stage is not None:
                on_stage(outcome.record, model)
            if on_progress is not None:
                on_progress(StageProgress(t + 1, alive, list(stages), dict(totals), model.state_dict()))
    except BaseException:
        write_weights(model, run.moved, {n: v.reshape(-1) for n, v in original.items()})
        raise
    values = {n: outcome.values[n].reshape(original[n].shape) for n in parameter_names}
    masks = {n: outcome.alive[n].reshape(original[n].shape) for n in parameter_names}
    write_weights(model, list(parameter_names), {n: v.reshape(-1) for n, v in original.items()})
    write_weights(model, list(config.compensate), outcome.values)
    apply_pruning(model, values, masks)
    if on_block is not None:
        for rec in outcome.blocks:
            on_block(rec)
    kept = sum(int(m.sum()) for m in masks.values())
    n_total = sum(m.numel() for m in masks.values())
    log.info("pruned %d of %d weights in %.1f s (%d stage%s)", n_total - kept, n_total, totals["prune"],
             len(stages), "s" if len(stages) > 1 else "")
    return PruneReport(
        config=config.to_dict(), blocks=outcome.blocks, n_total=n_total, n_keep=kept,
        achieved_sparsity=1.0 - kept / n_total, fisher_seconds=totals["fisher"], select_seconds=totals["select"],
        update_seconds=totals["update"], prune_seconds=totals["prune"], stages=stages, masks=masks,
        results=outcome.results,
    )
