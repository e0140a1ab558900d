"""One stage of a pruning run: gradients → block problems → budget → select → update → step.

A run with K stages prunes along a schedule towards the target sparsity; every stage recomputes the gradient
rows at the current weights (fresh samples), keeps the weights already pruned at zero, and selects and updates
again (multi-stage one-shot pruning as CHITA++, no SGD). With ``first_order`` the quadratic model includes the
mean gradient g = (1/B)·mean of the rows (B = ``fisher_batch``: with mini-batch rows F_B ≈ F/B, so the model
stays proportional to the loss's second-order Taylor model), and the update becomes a damped Newton step.
``step_search`` then moves from the masked weights towards the updated ones by the step τ of lowest training
loss (:func:`engine.losses.search_steps`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from formulations.allocation import allocate_global, allocate_uniform, n_keep_for
from formulations.patterns import pattern_keep
from formulations.objective import UpdateMemo
from formulations.problem import BlockProblem

from .blocks import Block, make_blocks
from .config import BlockRecord, PruneConfig, StageRecord, stage_schedule
from .executor import make_executor
from .fisher import per_sample_gradients
from .losses import BlockLoss, LossFn, PrefixLoss, step_search
from .options import SolveOptions
from .progress import get_logger
from .result import SolveResult, Status, Termination
from .solve import check_result
from .solvers.base import SubsetSolver, top_support
from .sources import Samples
from .update import batched_update
from . import variants

__all__ = ["Run", "StageOutcome", "run_stage", "stage_seed"]

log = get_logger(__name__)


@dataclass
class Run:
    """What every stage of one run shares."""

    model: nn.Module
    names: list[str]  # the pruned parameters
    train: Samples
    config: PruneConfig  # compensate already resolved to names
    solver: SubsetSolver
    loss: LossFn
    transposed: frozenset[str] = frozenset()
    cache: dict | None = None
    pool: Any = None  # the executor (engine.executor), made at the first stage

    @property
    def executor(self) -> Any:
        """Where the stage's blocks are solved (``config.executor``; :func:`engine.executor.make_executor`)."""
        if self.pool is None:
            c = self.config
            self.pool = make_executor(c.executor, c.workers, c.ray_address, "prune()")
        return self.pool

    @property
    def moved(self) -> list[str]:
        """Every parameter a stage writes: the pruned ones and the compensating ones."""
        return list(self.names) + list(self.config.compensate)


@dataclass
class StageOutcome:
    record: StageRecord
    blocks: list[BlockRecord]
    results: list[SolveResult]
    values: dict[str, torch.Tensor]  # flat new weights per parameter (zeros where pruned)
    alive: dict[str, torch.Tensor]  # flat bool masks after the stage
    fisher: float
    select: float
    update: float
    prune: float


def stage_seed(seed: int, stage: int) -> int:
    """Seed of the sample draw of stage ``stage`` (0-based): stage 0 uses ``seed`` itself, so a one-stage run
    draws exactly what it always drew; later stages draw fresh samples."""
    return seed if stage == 0 else seed + 100_003 * stage


def run_stage(run: Run, stage: int, target: float, alive: dict[str, torch.Tensor]) -> StageOutcome:
    """One stage (see the module docstring); the stage's weights and masks, not yet written into the model."""
    config, model, names = run.config, run.model, run.names
    show = config.progress
    params = dict(model.named_parameters())
    values = {n: params[n].detach() for n in run.moved}
    seed = stage_seed(config.seed, stage)
    n_stages = len(stage_schedule(config))  # a warm start changes the count
    tag = f" stage {stage + 1}/{n_stages}" if n_stages > 1 else ""

    # ---- gradients → block problems over the alive weights (k = 0 for now)
    t0 = time.perf_counter()
    if not config.needs_gradients:
        return _magnitude_stage(run, stage, target, alive, values)
    key = _cache_key(run, values, seed) if run.cache is not None and stage == 0 else None
    if key is not None and key in run.cache:
        blocks, positions, problems, drawn = run.cache[key]
    else:
        blocks, positions, problems, drawn = _stage_problems(run, values, alive, seed)
        if key is not None:
            run.cache[key] = (blocks, positions, problems, drawn)
    fisher_seconds = time.perf_counter() - t0
    m = len(problems) - len(config.compensate)
    comp_blocks, comp_problems = blocks[m:], [p.with_n_keep(p.n) for p in problems[m:]]
    blocks, positions, problems = blocks[:m], positions[:m], problems[:m]

    # ---- budget (over the alive weights; the dead ones count as pruned)
    n_total = sum(values[n].numel() for n in names)
    n_keep = min(n_keep_for(n_total, target), sum(p.n for p in problems))
    t_budget = time.perf_counter()
    ks, budget_info = _budget(config, problems, n_keep)
    problems = [p.with_n_keep(k, config.pattern) for p, k in zip(problems, ks)]
    budget_seconds = time.perf_counter() - t_budget

    # ---- select
    if config.loss_samples is not None:
        skip = config.fisher_samples * config.fisher_batch if config.holdout_loss else 0
        loss_x, loss_y = run.train.draw(config.loss_samples, seed, "loss_samples", skip=skip).tensors()
    else:
        loss_x, loss_y = drawn.tensors()
    t1 = time.perf_counter()
    prefix = PrefixLoss(model, loss_x, loss_y, loss=run.loss)
    memos = [UpdateMemo() for _ in problems]
    options = [
        SolveOptions(time_limit=config.time_limit, seed=config.seed, progress=bool(show) and len(blocks) == 1,
                     evaluate=BlockLoss(model, b, pos, prefix, problem=p if config.evaluate_update else None),
                     certify=config.certifies, memo=memo, certify_time=config.certify_time)
        for b, p, pos, memo in zip(blocks, problems, positions, memos)
    ]
    results = run.executor.solve(run.solver, problems, options, f"select ({run.solver.name}){tag}", show)
    select_seconds = time.perf_counter() - t1 + budget_seconds

    # ---- update (also scores E(S) for the record when the update is not applied)
    t2 = time.perf_counter()
    supports = [r.support for r in results]
    ukey = None if key is None else ("update", key, tuple(hashlib.sha1(np.packbits(s).tobytes()).hexdigest()
                                                           for s in supports))
    if ukey is not None and ukey in run.cache:
        updates = copy.deepcopy(run.cache[ukey])
    else:
        updates = batched_update(problems, supports, memos=memos)
        if ukey is not None:
            run.cache[ukey] = copy.deepcopy(updates)
    comp_supports = [np.ones(p.n, dtype=bool) for p in comp_problems]
    comp_updates = batched_update(comp_problems, comp_supports)
    if config.couple_mean:
        variants.couple_mean(problems + comp_problems, supports + comp_supports, updates + comp_updates,
                             config.fisher_batch)
    block_steps = None
    if config.block_steps:
        block_steps = variants.scale_block_steps(problems + comp_problems, supports + comp_supports,
                                                 updates + comp_updates)
    update_seconds = time.perf_counter() - t2
    records = []
    for b, p, r, u in zip(blocks, problems, results, updates):
        r.weights = u.weights
        check_result(p, r, run.solver, objective=u.objective, residual=u.residual, certify=config.certifies,
                     certify_time=config.certify_time)
        records.append(BlockRecord(
            label=b.label, n=p.n, k=p.n_keep, objective=r.objective, bound=r.bound, gap=r.gap,
            status=r.status.value, termination=r.termination.value, solve_seconds=r.wall_time,
            extra={k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool, type(None)))},
            overshoot=getattr(r, "overshoot", None),
        ))

    # ---- the stage's weights: masked (kept weights unchanged) and updated, per parameter
    masked = {n: values[n].reshape(-1).clone() for n in run.moved}
    updated = {n: values[n].reshape(-1).clone() for n in run.moved}
    if config.applies_update:
        for b, u in zip(comp_blocks, comp_updates):
            b.scatter(updated, torch.from_numpy(u.weights))
    new_alive = {n: alive[n].clone() for n in names}
    for b, p, r, pos in zip(blocks, problems, results, positions):
        keep = np.zeros(b.n, dtype=bool)
        keep[pos[r.support]] = True
        v = np.zeros(b.n)
        v[pos] = r.weights if config.applies_update else np.where(r.support, p.weights, 0.0)
        mask = torch.from_numpy(keep)
        b.scatter(new_alive, mask)
        b.scatter(updated, torch.from_numpy(v))
        b.scatter(masked, b.gather_values(masked) * mask)

    step, train_loss = 1.0, None
    if config.step_search and config.applies_update:
        start = masked
        if config.newton_step_only:
            start = {n: masked[n].clone() for n in run.moved}
            for b, u, pos in zip(blocks, variants.plain_updates(problems, supports), positions):
                v = np.zeros(b.n)
                v[pos] = u.weights
                b.scatter(start, torch.from_numpy(v))
        step, train_loss = step_search(model, run.moved, start, updated, loss_x, loss_y, config.step_search_bn,
                                       loss=run.loss)
        if step != 1.0:
            updated = {n: start[n] + step * (updated[n] - start[n]) for n in run.moved}
    kept = sum(int(m.sum()) for m in new_alive.values())
    # the certificates' own time (engine.certificate), so a run's records say what certifying cost it
    cert_seconds = float(sum(r.extra.get("certificate_seconds", 0.0) for r in results))
    record = StageRecord(
        stage=stage + 1, sparsity=float(target), n_keep=kept, objective_total=float(sum(r.objective for r in records)),
        fisher_seconds=fisher_seconds, select_seconds=select_seconds, update_seconds=update_seconds, step=step,
        train_loss=train_loss, extra={**(budget_info or {}), "certificate_seconds": cert_seconds,
                                      **({"ray": dict(run.executor.last)} if run.executor.name == "ray" else {})},
        block_steps=block_steps,
    )
    log.info("stage %d: sparsity %.4f, %d kept, E = %.4g, step %.3g", stage + 1, target, kept,
             record.objective_total, step)
    prune_seconds = select_seconds + (update_seconds if config.applies_update else 0.0)
    return StageOutcome(record, records, results, updated, new_alive, fisher_seconds, select_seconds,
                        update_seconds, prune_seconds)


def _magnitude_stage(run: Run, stage: int, target: float, alive: dict[str, torch.Tensor],
                     values: dict[str, torch.Tensor]) -> StageOutcome:
    """Magnitude masking without update or certificate: no gradients, no problems, no objective."""
    t0 = time.perf_counter()
    config = run.config
    blocks = make_blocks(run.names, [values[n].shape for n in run.names], config.block_mode, config.block_size,
                         run.transposed)
    weights = [b.gather_values(values).double().numpy() for b in blocks]
    masks = [b.gather_values(alive).numpy() for b in blocks]
    live = [np.where(m, np.abs(w), -1.0) for w, m in zip(weights, masks)]  # pruned weights never come back
    n_keep = n_keep_for(sum(w.size for w in weights), target)
    if config.pattern is not None:
        ks = [pattern_keep(w.size, config.pattern) for w in weights]
    elif len(blocks) == 1:
        ks = [n_keep]
    elif config.allocation == "uniform":
        ks = allocate_uniform([w.size for w in weights], n_keep)
    else:
        ks = allocate_global(live, n_keep)
    new_alive = {n: alive[n].clone() for n in run.names}
    updated = {n: values[n].reshape(-1).clone() for n in run.names}
    records, results = [], []
    for b, w, score, k in zip(blocks, weights, live, ks):
        support = top_support(score, k, config.pattern)
        keep = torch.from_numpy(support)
        b.scatter(new_alive, keep)
        b.scatter(updated, torch.from_numpy(np.where(support, w, 0.0)))
        results.append(SolveResult(support=support, objective=float("nan"), bound=None, gap=None,
                                   status=Status.FEASIBLE, termination=Termination.COMPLETED, solver="magnitude"))
        records.append(BlockRecord(label=b.label, n=w.size, k=int(k), objective=None, bound=None, gap=None,
                                   status="feasible", termination="completed", solve_seconds=0.0))
    seconds = time.perf_counter() - t0
    kept = sum(int(m.sum()) for m in new_alive.values())
    record = StageRecord(stage=stage + 1, sparsity=float(target), n_keep=kept, objective_total=None,
                         fisher_seconds=0.0, select_seconds=seconds, update_seconds=0.0)
    return StageOutcome(record, records, results, updated, new_alive, 0.0, seconds, 0.0, seconds)


def _cache_key(run: Run, values: dict[str, torch.Tensor], seed: int) -> tuple:
    """What stage-0 block problems depend on: the settings, the draw, the data and the weights (a sha1 of
    their bytes)."""
    c = run.config
    digest = hashlib.sha1()
    for n in run.moved:
        digest.update(n.encode())
        digest.update(values[n].detach().contiguous().cpu().numpy().tobytes())
    return (seed, c.fisher_samples, c.fisher_batch, c.damping, c.relative_damping, c.block_mode, c.block_size,
            c.first_order, c.fisher_bn_batch_stats, tuple(run.names), c.compensate, c.couple_mean, run.train.identity,
            id(run.loss), digest.hexdigest())


def _stage_problems(run: Run, values: dict[str, torch.Tensor], alive: dict[str, torch.Tensor],
                    seed: int) -> tuple[list[Block], list[np.ndarray], list[BlockProblem], Any]:
    """Gradients at the current weights and one BlockProblem (k = 0) per block over its alive weights; also the
    blocks, the alive positions in each block, and the drawn samples. A block with no alive weight left is
    left out of the lists (its weights stay zero). The compensating parameters' blocks come last."""
    config, names = run.config, run.names
    drawn = run.train.draw(config.fisher_samples * config.fisher_batch, seed, "fisher_samples")
    comp = list(config.compensate)
    grads = per_sample_gradients(run.model, names + comp, drawn, fisher_batch=config.fisher_batch,
                                 chunk_size=config.chunk_size, loss=run.loss, show_progress=config.progress,
                                 batch_stats=config.fisher_bn_batch_stats)
    blocks = make_blocks(names, grads.shapes[: len(names)], config.block_mode, config.block_size, run.transposed)
    positions = [np.flatnonzero(b.gather_values(alive).numpy()) for b in blocks]
    live = [i for i, pos in enumerate(positions) if pos.size > 0]
    blocks, positions = [blocks[i] for i in live], [positions[i] for i in live]
    comp_blocks = make_blocks(comp, grads.shapes[len(names):], "layer")
    blocks += comp_blocks
    positions += [np.arange(b.n) for b in comp_blocks]
    scale = 1.0 / math.sqrt(grads.n_rows)
    problems: list[BlockProblem] = []
    for b, pos in zip(blocks, positions):
        if len(blocks) == 1 and pos.size == grads.buffer.shape[1]:
            Xt = grads.buffer  # the whole network, nothing pruned yet: the gradient buffer itself
        else:
            Xt = b.gather_columns(grads.rows)  # a fresh (N, n_b) float32 tensor
            if pos.size < b.n:
                Xt = Xt[:, torch.from_numpy(pos)]
        Xt.mul_(scale)
        lam = config.damping
        if config.relative_damping:
            # λ = δ · mean(diag F), accumulated in float64 over column chunks (no float64 copy of X)
            diag_sum = sum(float(Xt[:, s : s + 4096].double().pow(2).sum()) for s in range(0, Xt.shape[1], 4096))
            lam = config.damping * diag_sum / max(Xt.shape[1], 1) if diag_sum > 0 else config.damping
        g = None
        if config.first_order:
            # mean row = Σ_i X_i / √N (X = G/√N), scaled by 1/B (see the module docstring)
            col_sum = torch.cat([Xt[:, s : s + 4096].double().sum(0) for s in range(0, Xt.shape[1], 4096)])
            g = (col_sum * (math.sqrt(grads.n_rows) / grads.n_rows / config.fisher_batch)).numpy()
            if config.couple_mean:
                Xt.sub_((col_sum / grads.n_rows).to(Xt.dtype))  # centred: X_cᵀX_c = F − m mᵀ
        w = b.gather_values(values).to(torch.float64).numpy()[pos]
        problems.append(BlockProblem(w, 0, lam, factor=Xt.numpy(), gradient=g, label=b.label))
    return blocks, positions, problems, drawn


def _budget(config: PruneConfig, problems: list[BlockProblem], n_keep: int) -> tuple[list[int], dict]:
    """k_b of every block (over its alive weights) so that Σ k_b = n_keep; (ks, details for the record).
    Under an N:M pattern every block keeps N of every M (n_b/M · N; the whole budget, as sparsity = 1 − N/M)."""
    if config.pattern is not None:
        return [pattern_keep(p.n, config.pattern) for p in problems], {}
    if len(problems) == 1:
        return [n_keep], {}
    if config.allocation == "uniform":
        return allocate_uniform([p.n for p in problems], n_keep), {}
    if config.allocation == "obs":
        from .solvers.woodfisher import obs_scores

        return allocate_global([obs_scores(p) for p in problems], n_keep), {}
    if config.allocation == "loss_curve":
        from .budget import loss_curve_allocation

        alloc = loss_curve_allocation(problems, n_keep)
        return alloc.n_keep, alloc.summary()
    return allocate_global([np.abs(p.weights) for p in problems], n_keep), {}
