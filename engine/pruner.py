"""One-shot combinatorial OBS pruning of a torch model (DESIGN.md §1-3).

    gradients (engine.fisher) → blocks (engine.blocks) → budget (formulations.allocation)
      → select (a SubsetSolver per block) → CBS-U update (engine.update) → check + certify (engine.solve)
      → masks and weights written into the model, all or nothing (engine.masking)

Python API::

    from engine.pruner import PruneConfig, prune
    report = prune(model, names, train_x, train_y, PruneConfig(sparsity=0.9, method="cbs"))
    report.blocks[0]  # n, k, objective, bound, gap, status, termination, ...
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from formulations.allocation import SCHEDULES, allocate_global, allocate_uniform, n_keep_for, sparsity_schedule
from formulations.objective import block_step_sizes
from formulations.problem import BlockProblem

from .blocks import BLOCK_MODES, Block, make_blocks
from .data import fast_layout
from .errors import InvalidOptionError, invalid_option
from .evaluate import eval_mode
from .fisher import per_sample_gradients
from .masking import apply_pruning, resolve
from .options import SolveOptions
from .progress import get_logger, progress
from .result import SolveResult
from .solve import check_result
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver
from .update import batched_update

__all__ = ["PruneConfig", "PruneReport", "BlockRecord", "StageRecord", "prune", "check_prune_inputs", "compensating_parameters", "COMPENSATE", "ALLOCATIONS", "default_update", "STEPS"]

log = get_logger(__name__)

ALLOCATIONS = ("magnitude", "obs", "uniform", "loss_curve")

#: methods whose selection is not second-order: by default their weights are only masked, not updated,
#: so that "magnitude" means plain magnitude pruning and "magnitude" + update is one flag away.
_NO_UPDATE_BY_DEFAULT = ("magnitude",)


def default_update(method: str | SubsetSolver) -> bool:
    """Whether ``method`` is followed by the CBS-U update when the caller does not say."""
    name = method if isinstance(method, str) else getattr(method, "name", "")
    return name not in _NO_UPDATE_BY_DEFAULT


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run (validated on construction, see :meth:`validate`).

    sparsity : fraction of the prunable weights to remove, in [0, 1).
    method : solver name or instance used to select each block's support.
    update : apply the CBS-U update (None: :func:`default_update` of the method).
    fisher_samples : N, number of gradient rows (>= 1).
    fisher_batch : samples averaged per row (>= 1); N · fisher_batch training samples are drawn.
    damping : λ > 0 (absolute, or relative to mean(diag F) with ``relative_damping``).
    block_mode, block_size : see :mod:`engine.blocks`.
    allocation : budget across blocks: "magnitude" (global |w| threshold), "obs" (global OBS-score
        threshold), "uniform" (same sparsity in every block), "loss_curve" (each block's loss E_b(k) on a
        grid of k, then the multiple-choice knapsack min Σ E_b(k_b) s.t. Σ k_b ≤ K solved exactly as a
        HiGHS MILP; :mod:`engine.budget`).
    seed : seeds the sample draw and every solver.
    time_limit : per-block solver time limit in seconds (None: none).
    solver_params : constructor parameters of the method.
    loss_samples : training samples used by a solver's ``evaluate`` callback (cbs) and by the step search;
        None = the Fisher samples. Drawn as a prefix of the same seeded permutation as the Fisher samples.
    holdout_loss : draw the loss samples right after the Fisher samples in that permutation instead, so the
        two sets are disjoint: the step search and mask scoring then judge the update on samples it was
        not fitted to. Needs ``loss_samples``; Fisher and loss samples together must fit in the training set.
    evaluate_update : the ``evaluate`` callback scores a mask after the CBS-U update of its block (else the
        kept weights keep their values, as in the CBS paper).
    certify : attach the dual certificate (bound, gap) to every block.
    chunk_size : training samples vmapped at once by the gradient computation (rows of ``fisher_batch``
        samples are never split; memory grows with it).
    progress : progress bars (None: when stderr is a terminal).
    stages : K >= 1. With K > 1 the model is pruned along ``schedule`` towards ``sparsity``
        (:func:`formulations.allocation.sparsity_schedule`); every stage recomputes the gradients at the
        current weights (new samples), keeps the weights already pruned at zero, and selects + updates
        again (multi-stage one-shot pruning, as CHITA++; no SGD).
    schedule : "linear", "exp" or "poly".
    first_order : include the mean gradient in the quadratic model, g = (1/B)·mean of the gradient rows
        (B = ``fisher_batch``; with mini-batch rows F_B ≈ F/B, so this keeps the model proportional to the
        loss's second-order Taylor model, CHITA's α = 1/B). Then the update is also a damped Newton step.
    step_search : after each stage, move from the masked weights towards the updated ones by the step
        τ ∈ {1, ½, ¼, …, 1/32, 0} with the lowest training loss on the loss samples (a safeguard when the
        quadratic model is trusted too far; τ = 1 is the plain update). The grid is walked down from
        τ = 1 until the loss stops falling, and τ = 0 is always tried (:func:`search_steps`).
    step_search_bn : the step search measures each candidate's loss with BatchNorm on the statistics of
        the loss samples (training mode; running statistics untouched), i.e. the loss after BatchNorm
        re-estimation, for runs that re-estimate it after every stage. No effect without BatchNorm.
    fisher_bn_batch_stats : the gradient rows are taken with BatchNorm on the statistics of each row's
        mini-batch (:func:`engine.fisher.per_sample_gradients` ``batch_stats``), the local model of the
        loss after BatchNorm re-estimation; needs ``fisher_batch`` >= 2. No effect without BatchNorm.
    workers : blocks solved in parallel by this many processes (1: in this process).
    compensate : parameters that are never pruned but are updated with the kept weights (e.g. the BatchNorm
        affine parameters and the layers left out of the pruned set), or a shorthand resolved against the
        model by :func:`compensating_parameters`: "rest" (every parameter outside the pruned set) or "norm"
        (the affine parameters of its normalisation layers). Each is its own block whose weights
        are all kept, so its update is the damped Newton step −(F_b + λI)⁻¹ g_b of the quadratic model and
        it moves with the stage's step τ. Needs ``first_order`` (with g = 0 and nothing pruned in the block
        the best update leaves it unchanged).
    couple_mean : couple the blocks through the mean gradient row m: the quadratic model's Hessian becomes
        blockdiag(Cov_b + λI) + m mᵀ (Cov_b the rows' covariance in block b) instead of
        blockdiag(Cov_b + m_b m_bᵀ + λI), so the blocks' Newton steps no longer each move the whole way
        along their share of m. The update is that model's exact joint step for the chosen supports
        (:func:`_couple_mean`: one more solve per block). Needs ``first_order``; selection, budget and the
        blocks' recorded E(S) are those of the centred blocks on their own.
    newton_step_only : with ``first_order`` and ``step_search``, the step search's segment starts at the
        CBS-U update without the gradient term (the compensation for the removed weights, exact under the
        quadratic model) instead of at the masked weights, so τ scales only the Newton part of the update.
        Costs one more update solve per block.
    block_steps : scale each block's update by its own step τ_b, the minimiser of the blocks' joint
        quadratic model with the full Fisher of the shared gradient rows, cross-block terms included
        (:func:`formulations.objective.block_step_sizes`: one product X_b e_b per block and a B×B solve),
        instead of letting every block take its own full step. The compensating blocks take part. The step
        search, when on, then scales the result as a whole. Needs the update; not with ``couple_mean`` or
        ``newton_step_only``. The τ_b of each stage are in its record (``block_steps``).
    """

    sparsity: float
    method: Any = "cbs"
    update: bool | None = None
    fisher_samples: int = 1000
    fisher_batch: int = 1
    damping: float = 1e-3
    relative_damping: bool = False
    block_mode: str = "layer"
    block_size: int | None = None
    allocation: str = "magnitude"
    seed: int = 0
    time_limit: float | None = None
    solver_params: dict[str, Any] = field(default_factory=dict)
    loss_samples: int | None = None
    holdout_loss: bool = False
    evaluate_update: bool = False
    certify: bool = True
    chunk_size: int = 256
    progress: bool | None = None
    stages: int = 1
    schedule: str = "exp"
    first_order: bool = False
    step_search: bool = False
    step_search_bn: bool = False
    fisher_bn_batch_stats: bool = False
    workers: int = 1
    compensate: tuple[str, ...] | str = ()
    couple_mean: bool = False
    newton_step_only: bool = False
    block_steps: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject bad settings with one clear message each (before any work starts)."""
        where = "prune()"
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < 1) or math.isnan(s):
            raise invalid_option("sparsity", where, "in [0, 1)", s)
        for name in ("fisher_samples", "fisher_batch", "chunk_size", "stages", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise invalid_option(name, where, "an integer >= 1", repr(v))
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            raise invalid_option("damping", where, "a finite number > 0", d)
        if self.block_mode not in BLOCK_MODES:
            raise invalid_option("block_mode", where, f"one of {', '.join(BLOCK_MODES)}", repr(self.block_mode))
        if self.block_mode == "chunk" and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise invalid_option("block_size", where, "an integer >= 1 when block_mode is 'chunk'", repr(self.block_size))
        if self.allocation not in ALLOCATIONS:
            raise invalid_option("allocation", where, f"one of {', '.join(ALLOCATIONS)}", repr(self.allocation))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise invalid_option("seed", where, "an integer >= 0", repr(self.seed))
        if self.time_limit is not None and not (
            isinstance(self.time_limit, (int, float)) and math.isfinite(self.time_limit) and self.time_limit > 0
        ):
            raise invalid_option("time_limit", where, "None or a number > 0", repr(self.time_limit))
        if self.loss_samples is not None and (not isinstance(self.loss_samples, int) or self.loss_samples < 1):
            raise invalid_option("loss_samples", where, "None or an integer >= 1", repr(self.loss_samples))
        if self.schedule not in SCHEDULES:
            raise invalid_option("schedule", where, f"one of {', '.join(SCHEDULES)}", repr(self.schedule))
        for name in ("first_order", "step_search", "step_search_bn", "evaluate_update", "relative_damping", "certify",
                     "fisher_bn_batch_stats", "holdout_loss", "couple_mean", "newton_step_only", "block_steps"):
            if not isinstance(getattr(self, name), bool):
                raise invalid_option(name, where, "True or False", repr(getattr(self, name)))
        if self.holdout_loss and self.loss_samples is None:
            raise invalid_option("loss_samples", where, "an integer >= 1 when holdout_loss is on", repr(self.loss_samples))
        if self.fisher_bn_batch_stats and self.fisher_batch < 2:
            raise invalid_option("fisher_batch", where, "an integer >= 2 when fisher_bn_batch_stats is on",
                                 repr(self.fisher_batch))
        if isinstance(self.compensate, str):
            if self.compensate not in COMPENSATE:
                raise invalid_option("compensate", where, f"one of {', '.join(COMPENSATE)} or a tuple of parameter "
                                     "names", repr(self.compensate))
        elif not isinstance(self.compensate, (tuple, list)) or not all(isinstance(n, str) for n in self.compensate):
            raise invalid_option("compensate", where, f"one of {', '.join(COMPENSATE)} or a tuple of parameter names",
                                 repr(self.compensate))
        else:
            object.__setattr__(self, "compensate", tuple(self.compensate))
        if self.newton_step_only and not (self.first_order and self.step_search):
            raise invalid_option("newton_step_only", where, "False unless first_order and step_search are on",
                                 repr(self.newton_step_only))
        if self.newton_step_only and self.couple_mean:
            raise invalid_option("newton_step_only", where, "False when couple_mean is on", repr(self.newton_step_only))
        if self.block_steps and (self.couple_mean or self.newton_step_only):
            raise invalid_option("block_steps", where, "False when couple_mean or newton_step_only is on",
                                 repr(self.block_steps))
        if self.block_steps and not self.applies_update:
            raise invalid_option("update", where, "True when block_steps is on (it scales the update)",
                                 repr(self.update))
        if self.couple_mean and not self.first_order:
            raise invalid_option("first_order", where, "True when couple_mean is on", repr(self.first_order))
        if self.compensate and not self.first_order:
            raise invalid_option("first_order", where, "True when compensate names parameters (without the "
                                 "gradient term their update is zero)", repr(self.first_order))
        if not isinstance(self.method, (str, SubsetSolver)) and not hasattr(self.method, "solve"):
            raise invalid_option("method", where, "a solver name or a SubsetSolver", repr(self.method))

    @property
    def method_name(self) -> str:
        """The method's name."""
        return self.method if isinstance(self.method, str) else getattr(self.method, "name", type(self.method).__name__)

    @property
    def applies_update(self) -> bool:
        """Whether the CBS-U update is applied."""
        return default_update(self.method) if self.update is None else bool(self.update)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings for records."""
        d = asdict(self)
        d["method"] = self.method_name
        d["update"] = self.applies_update
        return d


@dataclass
class BlockRecord:
    """What happened in one block (all JSON-friendly)."""

    label: str
    n: int
    k: int
    objective: float
    bound: float | None
    gap: float | None
    status: str
    termination: str
    solve_seconds: float
    selection_objective: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    """One stage of a (multi-stage) run: its target sparsity, timings and the step taken."""

    stage: int
    sparsity: float
    n_keep: int
    objective_total: float
    fisher_seconds: float
    select_seconds: float
    update_seconds: float
    step: float = 1.0
    train_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    block_steps: list[float] | None = None


@dataclass
class PruneReport:
    """Result of :func:`prune`: per-block records (of the last stage), per-stage records, timings, masks."""

    config: dict[str, Any]
    blocks: list[BlockRecord]
    n_total: int
    n_keep: int
    achieved_sparsity: float
    fisher_seconds: float
    select_seconds: float
    update_seconds: float
    prune_seconds: float
    stages: list[StageRecord] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    results: list[SolveResult] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors)."""
        return {
            "config": self.config,
            "n_total": self.n_total,
            "n_keep": self.n_keep,
            "achieved_sparsity": self.achieved_sparsity,
            "fisher_seconds": self.fisher_seconds,
            "select_seconds": self.select_seconds,
            "update_seconds": self.update_seconds,
            "prune_seconds": self.prune_seconds,
            "objective_total": float(sum(b.objective for b in self.blocks)),
            "blocks": [asdict(b) for b in self.blocks],
            "stages": [asdict(t) for t in self.stages],
        }


def _draw(inputs: torch.Tensor, count: int, seed: int, what: str) -> torch.Tensor:
    """The first ``count`` indices of a seeded permutation of the training set.

    The Fisher samples and the loss samples are prefixes of the same permutation, so the smaller set is
    always contained in the larger one and both are reproducible from the seed alone.
    """
    if count > inputs.shape[0]:
        raise invalid_option(what, "prune()", f"at most the {inputs.shape[0]} training samples", count)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(inputs.shape[0], generator=gen)[:count]


def _stage_seed(seed: int, stage: int) -> int:
    """Seed of the sample draw of stage ``stage`` (0-based): stage 0 uses ``seed`` itself, so a one-stage
    run draws exactly what it always drew; later stages draw fresh samples."""
    return seed if stage == 0 else seed + 100_003 * stage


def _mean_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 2000,
               batch_stats: bool = False) -> float:
    """Mean cross-entropy of ``model`` (eval mode, no gradients) on ``inputs``.

    ``batch_stats``: BatchNorm layers normalise with the statistics of each batch of ``inputs`` (training
    mode) instead of their running statistics, which are left exactly as they were. That is the loss the
    weights will have once BatchNorm is re-estimated, which stale running statistics misjudge after pruning."""
    total, count = 0.0, 0
    # with running statistics the batch size does not change the loss, and on the CPU batches of a few
    # hundred stay in cache (ResNet20: 2x faster than 2,000); with batch statistics it defines them
    step = _loss_step(batch, batch_stats)
    with eval_mode(model, batch_stats), torch.no_grad():
        for s in range(0, inputs.shape[0], step):
            out = model(fast_layout(inputs[s : s + step]))
            total += float(nn.functional.cross_entropy(out, targets[s : s + step], reduction="sum"))
            count += out.shape[0]
    return total / max(count, 1)


def _loss_step(batch: int, batch_stats: bool = False) -> int:
    """Images per forward pass of the training losses (:func:`_mean_loss`, :class:`_PrefixLoss`: the same
    batches, so their losses agree bit for bit)."""
    return batch if batch_stats else min(batch, 256)


class _PrefixLoss:
    """The eval-mode mean loss of ``model`` on fixed ``inputs``, keeping the activations that enter one
    part of the model's forward chain (:func:`engine.models.forward_chain`) so that a loss after changing
    only the parameters of that part and later ones runs the suffix alone.

    One cache slot per stage of selection, shared by the blocks' ``evaluate`` callbacks: while blocks are
    selected the model's weights are those of the stage's start (each call restores what it changed), so
    the activations entering a part are the same for every call that changes nothing before it. Blocks
    come in model order, so one slot serves a run of blocks in the same part. Batches are those of
    :func:`_mean_loss` (eval mode, :func:`_loss_step` images, channels-last), and the per-batch
    operations are the same, so the loss equals the full forward pass's bit for bit. ResNet20, 200 images,
    one thread: the 18 block convs' 275 calls of a ``cbs`` run take about half the time.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 2000) -> None:
        from .models import forward_chain

        self.model, self.inputs, self.targets, self.step = model, inputs, targets, _loss_step(batch)
        self.batch = batch
        self.chain = forward_chain(model)
        self.slot: tuple[int, list[torch.Tensor]] | None = None

    def first_part(self, parameters: list[torch.Tensor]) -> int:
        """Index of the first part that reads any of ``parameters`` (0 without a chain: the whole pass)."""
        if self.chain is None:
            return 0
        ids = {id(p) for p in parameters}
        return next((i for i, (_, owned) in enumerate(self.chain) if owned & ids), 0)

    def __call__(self, part: int) -> float:
        """Mean cross-entropy, parts before ``part`` taken from the cache (computed on first use)."""
        if self.chain is None or part == 0:
            return _mean_loss(self.model, self.inputs, self.targets, self.batch)
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
                total += float(nn.functional.cross_entropy(h, self.targets[s : s + self.step], reduction="sum"))
                count += h.shape[0]
        return total / max(count, 1)


class _BlockLoss:
    """``evaluate(support) -> training loss`` of the model with one block's weights masked.

    ``support`` is over the block's *alive* weights (``positions``: their indices in the block's flat
    vector; the others are already pruned and stay zero). Without ``problem`` the kept weights keep their
    values (the paper's choice: no update while selecting). With ``problem`` the kept weights get the
    CBS-U update first, so masks are compared by the loss they will really have (costly when k is large:
    one k×k or N×N solve per call). The block's weights are written in place, the loss is computed without
    gradients, and the original values are restored before returning (also on error).
    """

    def __init__(self, model: nn.Module, block: Block, inputs: torch.Tensor, targets: torch.Tensor,
                 positions: np.ndarray, batch: int = 2000, problem: BlockProblem | None = None,
                 prefix: _PrefixLoss | None = None):
        self.model, self.block, self.inputs, self.targets, self.batch = model, block, inputs, targets, batch
        self.problem = problem
        self.positions = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        self.params = {name: getattr(*resolve(model, name)) for name, _, _ in block.segments}
        # the loss from the first part of the forward chain that reads the block (shared per stage)
        self.prefix = prefix if prefix is not None else _PrefixLoss(model, inputs, targets, batch)
        self.part = self.prefix.first_part(list(self.params.values()))

    def __call__(self, support: np.ndarray) -> float:
        mask = torch.zeros(self.block.n, dtype=torch.bool)
        mask[self.positions] = torch.from_numpy(np.asarray(support, dtype=bool))
        updated = None
        if self.problem is not None:
            updated = torch.zeros(self.block.n, dtype=torch.float64)
            updated[self.positions] = torch.from_numpy(batched_update([self.problem], [support])[0].weights)
        saved = []
        offset = 0
        with torch.no_grad():
            try:
                for name, start, stop in self.block.segments:
                    flat = self.params[name].data.view(-1)
                    seg = flat[start:stop]
                    saved.append((flat, start, stop, seg.clone()))
                    if updated is not None:
                        seg.copy_(updated[offset : offset + stop - start].to(seg.dtype))
                    seg.mul_(mask[offset : offset + stop - start].to(seg.dtype))
                    offset += stop - start
                return self.prefix(self.part)
            finally:
                for flat, start, stop, original in saved:
                    flat[start:stop] = original


# ----------------------------------------------------------------------------- parallel solves
#: (solver, problems, options) of the pool's current job; forked workers inherit it (no pickling of X)
_POOL_JOB: tuple[Any, list[BlockProblem], list[SolveOptions]] | None = None


def _pool_solve(i: int) -> tuple[int, SolveResult, float]:
    solver, problems, options = _POOL_JOB  # type: ignore[misc]
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = solver.solve(problems[i], options[i])
    return i, result, time.perf_counter() - start


def _solve_blocks(solver: SubsetSolver, problems: list[BlockProblem], options: list[SolveOptions], workers: int,
                  desc: str, show: bool | None) -> list[SolveResult]:
    """Solve every block, in this process or in ``workers`` forked processes (results in block order)."""
    global _POOL_JOB
    results: list[SolveResult | None] = [None] * len(problems)
    seconds = [0.0] * len(problems)
    if workers > 1 and len(problems) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _POOL_JOB = (solver, problems, options)
        try:
            # fork: workers share the problems' arrays copy-on-write instead of receiving pickled copies
            with ProcessPoolExecutor(max_workers=min(workers, len(problems)), mp_context=mp.get_context("fork")) as pool:
                # largest blocks first, so a long one does not start last
                order = sorted(range(len(problems)), key=lambda i: -problems[i].n)
                for i, result, elapsed in progress(pool.map(_pool_solve, order), total=len(order), desc=desc,
                                                   enabled=show):
                    results[i], seconds[i] = result, elapsed
        finally:
            _POOL_JOB = None
    else:
        for i in progress(range(len(problems)), total=len(problems), desc=desc, enabled=show):
            start = time.perf_counter()
            results[i] = solver.solve(problems[i], options[i])
            seconds[i] = time.perf_counter() - start
    for r, t in zip(results, seconds):
        if not r.wall_time:  # type: ignore[union-attr]
            r.wall_time = t  # type: ignore[union-attr]
    return results  # type: ignore[return-value]


def _budget(config: PruneConfig, problems: list[BlockProblem], n_keep: int, dead: int) -> tuple[list[int], dict]:
    """k_b of every block (over its alive weights) so that Σ k_b = n_keep; ``dead`` weights are already
    pruned. Returns (ks, details for the record)."""
    if len(problems) == 1:
        return [n_keep], {}
    if config.allocation == "uniform":
        return allocate_uniform([p.n for p in problems], n_keep), {}
    if config.allocation == "obs":
        from .solvers.woodfisher import obs_scores  # heavy only when asked for

        return allocate_global([obs_scores(p) for p in problems], n_keep), {}
    if config.allocation == "loss_curve":
        from .budget import loss_curve_allocation

        alloc = loss_curve_allocation(problems, n_keep)
        return alloc.n_keep, alloc.summary()
    return allocate_global([np.abs(p.weights) for p in problems], n_keep), {}


#: shorthands for PruneConfig.compensate
COMPENSATE = ("rest", "norm")


def compensating_parameters(model: nn.Module, parameter_names: list[str], spec: tuple[str, ...] | str) -> tuple[str, ...]:
    """The parameter names a ``PruneConfig.compensate`` value stands for: the tuple itself, or for "rest"
    every trainable parameter of ``model`` outside ``parameter_names``, for "norm" those of its
    normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...), in the model's order."""
    if not isinstance(spec, str):
        return tuple(spec)
    if spec not in COMPENSATE:
        raise invalid_option("spec", "compensating_parameters()", f"one of {', '.join(COMPENSATE)} or a tuple of "
                             "parameter names", repr(spec))
    pruned = set(parameter_names)
    if spec == "rest":
        return tuple(n for n, p in model.named_parameters() if p.requires_grad and n not in pruned)
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, norm_types):
            out += [f"{mod_name}.{n}" if mod_name else n for n, p in mod.named_parameters(recurse=False)
                    if p.requires_grad]
    return tuple(n for n in out if n not in pruned)


def check_prune_inputs(model: nn.Module, parameter_names: list[str], n_train: int,
                       config: PruneConfig) -> SubsetSolver:
    """Every check :func:`prune` makes before any work, on its own (callers that load data first, such as
    ``cbs prune``, run it before evaluating anything): the config type, the parameter names, the method
    (and its solver being installed), the Fisher and loss sample counts against ``n_train`` training
    samples, and the method's largest block. Raises :class:`InvalidOptionError` (a user-input error)
    naming the argument; returns the solver."""
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
    rows = config.fisher_samples * config.fisher_batch
    if rows > n_train:
        raise invalid_option("fisher_samples", "prune()", f"fisher_samples x fisher_batch at most the {n_train} "
                             "training samples", f"{config.fisher_samples} x {config.fisher_batch} = {rows}")
    if config.loss_samples is not None:
        if config.loss_samples > n_train:
            raise invalid_option("loss_samples", "prune()", f"at most the {n_train} training samples",
                                 config.loss_samples)
        if config.holdout_loss and rows + config.loss_samples > n_train:
            raise invalid_option("loss_samples", "prune()", f"at most the {n_train - rows} training "
                                 f"samples left after the {rows} Fisher samples (holdout_loss)", config.loss_samples)
    cap = solver.capabilities
    largest = max(b.n for b in make_blocks(parameter_names, [params[n].shape for n in parameter_names],
                                           config.block_mode, config.block_size))
    if cap.max_size is not None and largest > cap.max_size:
        raise InvalidOptionError(
            f"Method '{solver.name}' accepts blocks of at most {cap.max_size} weights; the largest block has "
            f"{largest}. Use --block-mode chunk --block-size B (B <= {cap.max_size}) or another method."
        )
    return solver


def prune(
    model: nn.Module,
    parameter_names: list[str],
    train_inputs: torch.Tensor,
    train_targets: torch.Tensor,
    config: PruneConfig,
    on_block: Callable[[BlockRecord], None] | None = None,
    on_stage: Callable[[StageRecord, nn.Module], None] | None = None,
    cache: dict | None = None,
) -> PruneReport:
    """Prune ``parameter_names`` of ``model`` in one shot (or in ``config.stages`` stages); the model is
    edited in place (all or nothing: on an error it is restored).

    Parameters
    ----------
    model : a torch module (evaluated in eval mode for gradients and losses).
    parameter_names : the prunable parameters (e.g. from ``engine.models.prunable_parameters``).
    train_inputs, train_targets : training data (M, ...) and labels (M,) from which the Fisher samples
        (and the loss samples) are drawn with ``config.seed``.
    config : :class:`PruneConfig`.
    on_block : called with each finished block's record of the last stage (progress, resumable logs).
    on_stage : called after every stage but the last with its record and the model, whose weights are then
        the stage's (pruned weights zero, no masks yet): e.g. to re-estimate BatchNorm or log accuracy.
    cache : a dict the caller keeps between calls (sweeps): the first stage's gradients and block
        problems are stored there and reused by later calls with the same weights (checked by a
        fingerprint), samples and Fisher settings, and so are derived data such as diag(H⁻¹) and the
        update of every set of supports already solved.
    """
    solver = check_prune_inputs(model, parameter_names, int(train_inputs.shape[0]), config)
    if isinstance(config.compensate, str):
        config = replace(config, compensate=compensating_parameters(model, parameter_names, config.compensate))
    params = dict(model.named_parameters())
    moved = list(parameter_names) + list(config.compensate)  # every parameter a stage writes
    original = {n: params[n].detach().clone() for n in moved}
    alive = {n: torch.ones(params[n].numel(), dtype=torch.bool) for n in parameter_names}
    schedule = sparsity_schedule(config.sparsity, config.stages, config.schedule)
    stages: list[StageRecord] = []
    totals = {"fisher": 0.0, "select": 0.0, "update": 0.0, "prune": 0.0}
    try:
        for t, target in enumerate(schedule):
            last = t == len(schedule) - 1
            outcome = _run_stage(model, parameter_names, train_inputs, train_targets, config, solver, t, target,
                                 alive, last, cache)
            stages.append(outcome.record)
            for key in totals:
                totals[key] += getattr(outcome, key)
            if last:
                break
            _write_weights(model, moved, outcome.values)
            alive = outcome.alive
            if on_stage is not None:
                on_stage(outcome.record, model)
    except BaseException:
        _write_weights(model, moved, {n: v.reshape(-1) for n, v in original.items()})
        raise
    values = {n: outcome.values[n].reshape(original[n].shape) for n in parameter_names}
    masks = {n: outcome.alive[n].reshape(original[n].shape) for n in parameter_names}
    _write_weights(model, parameter_names, {n: v.reshape(-1) for n, v in original.items()})
    _write_weights(model, list(config.compensate), outcome.values)
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


def _write_weights(model: nn.Module, names: list[str], flat: dict[str, torch.Tensor]) -> None:
    """Copy flat weight vectors into the (unmasked) parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].view(-1).copy_(flat[n].to(params[n].dtype))


@dataclass
class _StageOutcome:
    record: StageRecord
    blocks: list[BlockRecord]
    results: list[SolveResult]
    values: dict[str, torch.Tensor]  # flat new weights per parameter (zeros where pruned)
    alive: dict[str, torch.Tensor]  # flat bool masks after the stage
    fisher: float
    select: float
    update: float
    prune: float


def _run_stage(model: nn.Module, names: list[str], train_inputs: torch.Tensor, train_targets: torch.Tensor,
               config: PruneConfig, solver: SubsetSolver, stage: int, target: float,
               alive: dict[str, torch.Tensor], last: bool, cache: dict | None = None) -> _StageOutcome:
    """One stage: gradients at the current weights → blocks over the alive weights → budget → select →
    update → (step search) → the stage's weights and masks (not yet written into the model)."""
    show = config.progress
    params = dict(model.named_parameters())
    moved = names + list(config.compensate)
    values = {n: params[n].detach() for n in moved}
    seed = _stage_seed(config.seed, stage)
    tag = f" stage {stage + 1}/{config.stages}" if config.stages > 1 else ""

    # ---- gradients → block problems over the alive weights (k = 0 for now)
    t0 = time.perf_counter()
    key = _cache_key(config, names, values, seed) if cache is not None and stage == 0 else None
    if key is not None and key in cache:
        blocks, positions, problems, x, y = cache[key]
    else:
        blocks, positions, problems, x, y = _stage_problems(model, names, values, alive, train_inputs, train_targets,
                                                            config, seed)
        if key is not None:
            cache[key] = (blocks, positions, problems, x, y)
    fisher_seconds = time.perf_counter() - t0
    m = len(problems) - len(config.compensate)
    comp_blocks, comp_problems = blocks[m:], [p.with_n_keep(p.n) for p in problems[m:]]
    blocks, positions, problems = blocks[:m], positions[:m], problems[:m]

    # ---- budget (over the alive weights; the dead ones, also those of blocks left out, count as pruned)
    n_total = sum(values[n].numel() for n in names)  # the compensating parameters are not counted
    n_keep = n_keep_for(n_total, target)
    n_alive = sum(p.n for p in problems)
    n_keep = min(n_keep, n_alive)
    t_budget = time.perf_counter()
    ks, budget_info = _budget(config, problems, n_keep, n_total - n_alive)
    problems = [p.with_n_keep(k) for p, k in zip(problems, ks)]
    budget_seconds = time.perf_counter() - t_budget

    # ---- select
    loss_x, loss_y = x, y
    if config.loss_samples is not None:
        skip = config.fisher_samples * config.fisher_batch if config.holdout_loss else 0
        lidx = _draw(train_inputs, skip + config.loss_samples, seed, "loss_samples")[skip:]
        loss_x, loss_y = train_inputs[lidx], train_targets[lidx]
    t1 = time.perf_counter()
    prefix = _PrefixLoss(model, loss_x, loss_y)
    options = [
        SolveOptions(
            time_limit=config.time_limit,
            seed=config.seed,
            progress=bool(show) and len(blocks) == 1,
            evaluate=_BlockLoss(model, b, loss_x, loss_y, pos, problem=p if config.evaluate_update else None,
                                prefix=prefix),
            certify=config.certify,
        )
        for b, p, pos in zip(blocks, problems, positions)
    ]
    results = _solve_blocks(solver, problems, options, config.workers, f"select ({solver.name}){tag}", show)
    select_seconds = time.perf_counter() - t1 + budget_seconds

    # ---- update (also scores E(S) for the record when the update is not applied)
    t2 = time.perf_counter()
    # a sweep's cache also keeps the updates: "magnitude" (scored by the update) and "magnitude+update"
    # choose the same supports of the same problems, so the second one reuses the first one's solve
    ukey = None
    if key is not None:
        ukey = ("update", key, tuple(hashlib.sha1(np.ascontiguousarray(r.support).tobytes()).hexdigest()
                                     for r in results))
    if ukey is not None and ukey in cache:
        updates = copy.deepcopy(cache[ukey])
    else:
        updates = batched_update(problems, [r.support for r in results])
        if ukey is not None:
            cache[ukey] = copy.deepcopy(updates)
    comp_supports = [np.ones(p.n, dtype=bool) for p in comp_problems]
    comp_updates = batched_update(comp_problems, comp_supports)
    if config.couple_mean:
        _couple_mean(problems + comp_problems, [r.support for r in results] + comp_supports, updates + comp_updates,
                     config.fisher_batch)
    block_steps = None
    if config.block_steps:
        joint = problems + comp_problems
        joint_supports = [r.support for r in results] + comp_supports
        joint_updates = updates + comp_updates
        taus = block_step_sizes(joint, joint_supports, [u.weights for u in joint_updates])
        for p, sup, u, t in zip(joint, joint_supports, joint_updates, taus):
            m = np.where(sup, p.weights, 0.0)
            u.weights = m + t * (u.weights - m)
        block_steps = [float(t) for t in taus]
        log.info("block steps: %s", " ".join(f"{t:.3g}" for t in block_steps))
    update_seconds = time.perf_counter() - t2
    records = []
    for b, p, r, u in zip(blocks, problems, results, updates):
        check_result(p, r, solver, objective=u.objective, residual=u.residual, certify=config.certify)
        r.weights = u.weights
        records.append(BlockRecord(
            label=b.label, n=p.n, k=p.n_keep, objective=r.objective, bound=r.bound, gap=r.gap,
            status=r.status.value, termination=r.termination.value, solve_seconds=r.wall_time,
            extra={k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool, type(None)))},
        ))

    # ---- the stage's weights: masked (kept weights unchanged) and updated, per parameter
    masked = {n: values[n].reshape(-1).clone() for n in moved}
    updated = {n: values[n].reshape(-1).clone() for n in moved}
    if config.applies_update:
        for b, u in zip(comp_blocks, comp_updates):
            b.scatter(updated, torch.from_numpy(u.weights))
    new_alive = {n: alive[n].clone() for n in names}
    for b, p, r, pos in zip(blocks, problems, results, positions):
        keep = np.zeros(b.n, dtype=bool)
        keep[pos[r.support]] = True
        v = np.zeros(b.n)
        v[pos] = r.weights if config.applies_update else np.where(r.support, p.weights, 0.0)
        m = torch.from_numpy(keep)
        b.scatter(new_alive, m)
        b.scatter(updated, torch.from_numpy(v))
        b.scatter(masked, b.gather_values(masked) * m)

    step, train_loss = 1.0, None
    if config.step_search and config.applies_update:
        start = masked
        if config.newton_step_only:
            # the segment starts at the CBS-U update without the gradient term (the removal's compensation,
            # exact under the quadratic model) instead of the masked weights: only the Newton part is scaled
            plain = batched_update([BlockProblem(p.weights, p.n_keep, p.damping, factor=p.factor, fisher=p.fisher,
                                                 label=p.label, _cache=p._cache) for p in problems],
                                   [r.support for r in results])
            start = {n: masked[n].clone() for n in moved}
            for b, u, pos in zip(blocks, plain, positions):
                v = np.zeros(b.n)
                v[pos] = u.weights
                b.scatter(start, torch.from_numpy(v))
        step, train_loss = _step_search(model, moved, start, updated, loss_x, loss_y, config.step_search_bn)
        if step != 1.0:
            updated = {n: start[n] + step * (updated[n] - start[n]) for n in moved}
    kept = sum(int(m.sum()) for m in new_alive.values())
    prune_seconds = select_seconds + (update_seconds if config.applies_update else 0.0)
    record = StageRecord(
        stage=stage + 1, sparsity=float(target), n_keep=kept, objective_total=float(sum(r.objective for r in records)),
        fisher_seconds=fisher_seconds, select_seconds=select_seconds, update_seconds=update_seconds, step=step,
        train_loss=train_loss, extra=budget_info, block_steps=block_steps,
    )
    log.info("stage %d: sparsity %.4f, %d kept, E = %.4g, step %.3g", stage + 1, target, kept,
             record.objective_total, step)
    return _StageOutcome(record, records, results, updated, new_alive, fisher_seconds, select_seconds,
                         update_seconds, prune_seconds)


def _couple_mean(problems: list[BlockProblem], supports: list[np.ndarray], updates: list, batch: int) -> None:
    """The joint Newton step of the blocks under H = blockdiag(Cov_b + λI) + m mᵀ (m: the mean gradient row
    over all blocks; the blocks' factors are centred, so Cov_b = X_bᵀX_b): with d_b⁰ each block's own update
    and a_b = −(H_b)_SS⁻¹ m_S (zero off S), d_b = d_b⁰ + s a_b with s = Σ m_bᵀd_b⁰ / (1 + Σ m_bᵀ H_b⁻¹ m_b).
    Edits ``updates[i].weights`` in place."""
    means = [p.gradient * batch for p in problems]  # m_b: the gradient term is m_b / B
    aux = [BlockProblem(np.zeros(p.n), p.n_keep, p.damping, factor=p.factor, gradient=m_b)
           for p, m_b in zip(problems, means)]
    a = [u.weights for u in batched_update(aux, supports)]
    s0 = sum(float(m_b @ (u.weights - p.weights)) for p, m_b, u in zip(problems, means, updates))
    c = -sum(float(m_b @ ab) for m_b, ab in zip(means, a))
    s = s0 / (1.0 + c)
    log.info("coupled mean step: s0 = %.4g, c = %.4g", s0, c)
    for u, ab in zip(updates, a):
        u.weights = u.weights + s * ab


def _cache_key(config: PruneConfig, names: list[str], values: dict[str, torch.Tensor], seed: int) -> tuple:
    """What stage-0 block problems depend on: the settings, the draw and (a fingerprint of) the weights."""
    fingerprint = tuple((float(values[n].double().sum()), float(values[n].double().pow(2).sum())) for n in names)
    return (seed, config.fisher_samples, config.fisher_batch, config.damping, config.relative_damping,
            config.block_mode, config.block_size, config.first_order, config.fisher_bn_batch_stats, tuple(names),
            config.compensate, config.couple_mean, fingerprint)


def _stage_problems(model: nn.Module, names: list[str], values: dict[str, torch.Tensor], alive: dict[str, torch.Tensor],
                    train_inputs: torch.Tensor, train_targets: torch.Tensor, config: PruneConfig, seed: int) -> tuple[list[Block], list[np.ndarray], list[BlockProblem], torch.Tensor, torch.Tensor]:
    """Gradients at the current weights and one BlockProblem (k = 0) per block over its alive weights;
    also the blocks, the alive positions in each block, and the drawn samples. A block with no alive
    weight left (an earlier stage pruned all of it, e.g. a row block) has nothing to select or update and
    is left out of the three lists; its weights stay zero. The blocks of ``config.compensate`` (never
    pruned) come last, one per parameter."""
    show = config.progress
    idx = _draw(train_inputs, config.fisher_samples * config.fisher_batch, seed, "fisher_samples")
    x, y = train_inputs[idx], train_targets[idx]
    comp = list(config.compensate)
    grads = per_sample_gradients(
        model, names + comp, x, y, fisher_batch=config.fisher_batch, chunk_size=config.chunk_size,
        show_progress=show, batch_stats=config.fisher_bn_batch_stats,
    )
    blocks = make_blocks(names, grads.shapes[: len(names)], config.block_mode, config.block_size)
    positions = [np.flatnonzero(b.gather_values(alive).numpy()) for b in blocks]
    live = [i for i, pos in enumerate(positions) if pos.size > 0]
    blocks, positions = [blocks[i] for i in live], [positions[i] for i in live]
    # the compensating parameters: one block each, every weight kept, after the pruned blocks
    comp_blocks = make_blocks(comp, grads.shapes[len(names):], "layer")
    blocks += comp_blocks
    positions += [np.arange(b.n) for b in comp_blocks]
    scale = 1.0 / math.sqrt(grads.n_rows)
    problems: list[BlockProblem] = []
    for b, pos in zip(blocks, positions):
        if len(blocks) == 1 and pos.size == grads.buffer.shape[1]:
            Xt = grads.buffer  # the whole network, nothing pruned yet: use the gradient buffer itself
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
            # mean row = Σ_i X_i / √N (X = G/√N), scaled by 1/B (see PruneConfig.first_order)
            col_sum = torch.cat([Xt[:, s : s + 4096].double().sum(0) for s in range(0, Xt.shape[1], 4096)])
            g = (col_sum * (math.sqrt(grads.n_rows) / grads.n_rows / config.fisher_batch)).numpy()
            if config.couple_mean:
                # centred factor: X_cᵀX_c = F − m mᵀ (the rows' covariance); m mᵀ comes back jointly
                Xt.sub_((col_sum / grads.n_rows).to(Xt.dtype))
        w = b.gather_values(values).to(torch.float64).numpy()[pos]
        problems.append(BlockProblem(w, 0, lam, factor=Xt.numpy(), gradient=g, label=b.label))
    return blocks, positions, problems, x, y


#: steps tried by the step search, largest first (τ = 1 is the plain update, τ = 0 the masked weights)
STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


def search_steps(loss: Callable[[float], float], steps: tuple[float, ...] = STEPS) -> tuple[float, float, int]:
    """The step of lowest ``loss`` among those tried; (τ, loss(τ), number of losses computed).

    ``steps`` run from the full update down to τ = 0 (the masked weights). They are tried in that order
    until one is no lower than the one before it (the loss along the segment has then passed its first
    minimum on the grid), and τ = steps[-1] is always tried as well. So the answer equals the minimum over
    the whole grid whenever the loss along τ has a single minimum there, and it is never above the masked
    weights' loss; typically three losses are computed instead of seven."""
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


def _step_search(model: nn.Module, names: list[str], masked: dict[str, torch.Tensor],
                 updated: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                 batch_stats: bool = False) -> tuple[float, float]:
    """The step τ of :func:`search_steps` over STEPS, on the training loss at masked + τ (updated − masked);
    (τ, loss).

    Both end points have the same support, so every candidate has the stage's sparsity. The model's
    weights are restored before returning."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().reshape(-1).clone() for n in names}

    def loss(tau: float) -> float:
        _write_weights(model, names, {n: masked[n] + tau * (updated[n] - masked[n]) for n in names})
        return _mean_loss(model, inputs, targets, batch_stats=batch_stats)

    try:
        tau, value, _ = search_steps(loss)
    finally:
        _write_weights(model, names, saved)
    return tau, value
