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

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from formulations.allocation import allocate_global, allocate_uniform, n_keep_for
from formulations.problem import BlockProblem

from .blocks import BLOCK_MODES, Block, make_blocks
from .errors import InvalidOptionError, invalid_option
from .fisher import per_sample_gradients
from .masking import apply_pruning, resolve
from .options import SolveOptions
from .progress import get_logger, progress
from .result import SolveResult
from .solve import check_result
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver
from .update import batched_update

__all__ = ["PruneConfig", "PruneReport", "BlockRecord", "prune", "ALLOCATIONS", "default_update"]

log = get_logger(__name__)

ALLOCATIONS = ("magnitude", "obs", "uniform")

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
        threshold), "uniform" (same sparsity in every block).
    seed : seeds the sample draw and every solver.
    time_limit : per-block solver time limit in seconds (None: none).
    solver_params : constructor parameters of the method.
    loss_samples : training samples used by a solver's ``evaluate`` callback (cbs); None = the Fisher samples.
        Drawn as a prefix of the same seeded permutation as the Fisher samples.
    evaluate_update : the ``evaluate`` callback scores a mask after the CBS-U update of its block (else the
        kept weights keep their values, as in the CBS paper).
    certify : attach the dual certificate (bound, gap) to every block.
    chunk_size : gradient rows vmapped at once.
    progress : progress bars (None: when stderr is a terminal).
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
    evaluate_update: bool = False
    certify: bool = True
    chunk_size: int = 256
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject bad settings with one clear message each (before any work starts)."""
        where = "prune()"
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < 1) or math.isnan(s):
            raise invalid_option("sparsity", where, "in [0, 1)", s)
        for name in ("fisher_samples", "fisher_batch", "chunk_size"):
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
class PruneReport:
    """Result of :func:`prune`: per-block records, timings, the masks written into the model."""

    config: dict[str, Any]
    blocks: list[BlockRecord]
    n_total: int
    n_keep: int
    achieved_sparsity: float
    fisher_seconds: float
    select_seconds: float
    update_seconds: float
    prune_seconds: float
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


class _BlockLoss:
    """``evaluate(support) -> training loss`` of the model with one block's weights masked.

    Without ``problem`` the kept weights keep their values (the paper's choice: no update while
    selecting). With ``problem`` the kept weights get the CBS-U update first, so masks are compared by
    the loss they will really have (costly when k is large: one k×k or N×N solve per call).
    The block's weights are written in place, the loss is computed without gradients, and the
    original values are restored before returning (also on error).
    """

    def __init__(self, model: nn.Module, block: Block, inputs: torch.Tensor, targets: torch.Tensor,
                 batch: int = 2000, problem: BlockProblem | None = None):
        self.model, self.block, self.inputs, self.targets, self.batch = model, block, inputs, targets, batch
        self.problem = problem
        self.params = {name: getattr(*resolve(model, name)) for name, _, _ in block.segments}

    def __call__(self, support: np.ndarray) -> float:
        support = np.asarray(support, dtype=bool)
        mask = torch.from_numpy(support)
        updated = None
        if self.problem is not None:
            updated = torch.from_numpy(batched_update([self.problem], [support])[0].weights)
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
                total, count = 0.0, 0
                was_training = self.model.training
                self.model.eval()
                for s in range(0, self.inputs.shape[0], self.batch):
                    out = self.model(self.inputs[s : s + self.batch])
                    total += float(nn.functional.cross_entropy(out, self.targets[s : s + self.batch], reduction="sum"))
                    count += out.shape[0]
                self.model.train(was_training)
                return total / count
            finally:
                for flat, start, stop, original in saved:
                    flat[start:stop] = original


def prune(
    model: nn.Module,
    parameter_names: list[str],
    train_inputs: torch.Tensor,
    train_targets: torch.Tensor,
    config: PruneConfig,
    on_block: Callable[[BlockRecord], None] | None = None,
) -> PruneReport:
    """Prune ``parameter_names`` of ``model`` in one shot; the model is edited in place (all or nothing).

    Parameters
    ----------
    model : a torch module (evaluated in eval mode for gradients and losses).
    parameter_names : the prunable parameters (e.g. from ``engine.models.prunable_parameters``).
    train_inputs, train_targets : training data (M, ...) and labels (M,) from which the Fisher samples
        (and the loss samples of the ``cbs`` method) are drawn with ``config.seed``.
    config : :class:`PruneConfig`.
    on_block : called with each finished block's record (progress reporting, resumable logs).
    """
    if not isinstance(config, PruneConfig):
        raise invalid_option("config", "prune()", "a PruneConfig", type(config).__name__)
    params = dict(model.named_parameters())
    missing = [n for n in parameter_names if n not in params]
    if missing or not parameter_names:
        raise invalid_option("parameter_names", "prune()", "a non-empty list of the model's parameter names", missing)
    solver = get_solver(config.method, **config.solver_params)
    if hasattr(solver, "ensure_available"):
        solver.ensure_available()
    show = config.progress

    # ---- gradients
    t0 = time.perf_counter()
    idx = _draw(train_inputs, config.fisher_samples * config.fisher_batch, config.seed, "fisher_samples")
    x, y = train_inputs[idx], train_targets[idx]
    grads = per_sample_gradients(
        model, parameter_names, x, y, fisher_batch=config.fisher_batch, chunk_size=config.chunk_size, show_progress=show
    )
    blocks = make_blocks(grads.names, grads.shapes, config.block_mode, config.block_size)
    cap = solver.capabilities
    if cap.max_size is not None and max(b.n for b in blocks) > cap.max_size:
        raise InvalidOptionError(
            f"Method '{solver.name}' accepts blocks of at most {cap.max_size} weights; the largest block has "
            f"{max(b.n for b in blocks)}. Use --block-mode chunk --block-size B (B <= {cap.max_size}) or another method."
        )
    values = {n: params[n].detach() for n in parameter_names}
    scale = 1.0 / math.sqrt(grads.n_rows)
    problems: list[BlockProblem] = []
    for b in blocks:
        Xt = b.gather_columns(grads.rows).mul_(scale)  # a fresh (N, n_b) float32 tensor, scaled in place
        lam = config.damping
        if config.relative_damping:
            # λ = δ · mean(diag F), accumulated in float64 over column chunks (no float64 copy of X)
            diag_sum = sum(float(Xt[:, s : s + 4096].double().pow(2).sum()) for s in range(0, Xt.shape[1], 4096))
            lam = config.damping * diag_sum / Xt.shape[1] if diag_sum > 0 else config.damping
        w = b.gather_values(values).to(torch.float64).numpy()
        problems.append(BlockProblem(w, 0, lam, factor=Xt.numpy(), label=b.label))
    del grads
    fisher_seconds = time.perf_counter() - t0

    # ---- budget
    n_total = sum(p.n for p in problems)
    n_keep = n_keep_for(n_total, config.sparsity)
    if len(problems) == 1:
        ks = [n_keep]
    elif config.allocation == "uniform":
        ks = allocate_uniform([p.n for p in problems], n_keep)
    elif config.allocation == "obs":
        from .solvers.woodfisher import obs_scores  # heavy only when asked for

        ks = allocate_global([obs_scores(p) for p in problems], n_keep)
    else:
        ks = allocate_global([np.abs(p.weights) for p in problems], n_keep)
    problems = [p.with_n_keep(k) for p, k in zip(problems, ks)]

    # ---- select
    loss_x, loss_y = x, y
    if config.loss_samples is not None:
        lidx = _draw(train_inputs, config.loss_samples, config.seed, "loss_samples")
        loss_x, loss_y = train_inputs[lidx], train_targets[lidx]
    t1 = time.perf_counter()
    results: list[SolveResult] = []
    for b, p in progress(list(zip(blocks, problems)), total=len(blocks), desc=f"select ({solver.name})", enabled=show):
        options = SolveOptions(
            time_limit=config.time_limit,
            seed=config.seed,
            progress=bool(show) and len(blocks) == 1,
            evaluate=_BlockLoss(model, b, loss_x, loss_y, problem=p if config.evaluate_update else None),
            certify=config.certify,
        )
        start = time.perf_counter()
        result = solver.solve(p, options)
        if not result.wall_time:
            result.wall_time = time.perf_counter() - start
        results.append(result)
    select_seconds = time.perf_counter() - t1

    # ---- update (also scores E(S) for the record when the update is not applied)
    t2 = time.perf_counter()
    updates = batched_update(problems, [r.support for r in results])
    update_seconds = time.perf_counter() - t2
    records = []
    for b, p, r, u in zip(blocks, problems, results, updates):
        check_result(p, r, solver, objective=u.objective, residual=u.residual, certify=config.certify)
        r.weights = u.weights
        rec = BlockRecord(
            label=b.label, n=p.n, k=p.n_keep, objective=r.objective, bound=r.bound, gap=r.gap,
            status=r.status.value, termination=r.termination.value, solve_seconds=r.wall_time,
            extra={k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool, type(None)))},
        )
        records.append(rec)
        if on_block is not None:
            on_block(rec)

    # ---- write (compute everything, then one transactional edit)
    new_flat = {n: values[n].reshape(-1).clone() for n in parameter_names}
    mask_flat = {n: torch.ones(values[n].numel(), dtype=torch.bool) for n in parameter_names}
    for b, p, r in zip(blocks, problems, results):
        v = torch.from_numpy(r.weights if config.applies_update else np.where(r.support, p.weights, 0.0))
        m = torch.from_numpy(r.support)
        offset = 0
        for name, start, stop in b.segments:
            size = stop - start
            new_flat[name][start:stop] = v[offset : offset + size].to(new_flat[name].dtype)
            mask_flat[name][start:stop] = m[offset : offset + size]
            offset += size
    new = {n: new_flat[n].reshape(values[n].shape) for n in parameter_names}
    masks = {n: mask_flat[n].reshape(values[n].shape) for n in parameter_names}
    apply_pruning(model, new, masks)
    kept = sum(int(m.sum()) for m in masks.values())
    prune_seconds = select_seconds + (update_seconds if config.applies_update else 0.0)
    log.info("pruned %d of %d weights in %.1f s", n_total - kept, n_total, prune_seconds)
    return PruneReport(
        config=config.to_dict(), blocks=records, n_total=n_total, n_keep=kept,
        achieved_sparsity=1.0 - kept / n_total, fisher_seconds=fisher_seconds, select_seconds=select_seconds,
        update_seconds=update_seconds, prune_seconds=prune_seconds, masks=masks, results=results,
    )
