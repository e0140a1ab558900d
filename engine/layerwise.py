"""Layer-wise reconstruction pruning (OBC, SparseGPT, Wanda, ALPS's objective) on the engine's solver stack.

For every pruned layer, in model order, with H = AᵀA/T its calibration-input Hessian
(:mod:`engine.calibration`) and λ = δ · mean(diag H) (δ = 0.01, as SparseGPT), row i of W is the block problem

    E_i(S) = min_v ½ (v − w_i)ᵀ (H + λI) (v − w_i),   v zero off S,  |S| = k  (or N of every M),

all rows sharing one factor X (XᵀX = H, computed once per layer, never copied per row). A row's answer
carries its bound and gap like every block of the Fisher objective; the kept weights get the closed-form
refit (CBS-U with this H). ``sequential`` (the default, as SparseGPT): layer l's inputs come from the model
whose earlier layers are already pruned; otherwise every H comes from the dense model.

Methods: ``sparsegpt`` (:mod:`formulations.sparsegpt`, the whole layer at once; its own weights and the
refit of its mask are both recorded) or any registered solver name, applied per row (``magnitude``,
``wanda``, ``woodfisher``, ``greedy`` (OBC's greedy OBS), ``swap``, ``iht``, ``bnb``, ...).

Reconstruction error of a layer: Σ_i (v_i − w_i)ᵀ H (v_i − w_i) = ‖A (V − W)ᵀ‖²_F / T, the mean squared change
of the layer's outputs on the calibration set (undamped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from formulations import objective as obj
from formulations.patterns import pattern_keep
from formulations.problem import BlockProblem, eigen_factor
from formulations.sparsegpt import sparsegpt

from .calibration import check_unfoldable, layer_hessian, layer_hessians
from .certificate import tighten_bound
from .errors import invalid_option
from .executor import make_executor
from .options import SolveOptions
from .resume import LayerProgress, check_callback
from .settings import option
from .solvers.registry import get_solver
from .update import shared_factor_update

__all__ = ["LayerRecord", "prune_layerwise", "check_layers", "layer_rows", "reconstruction_error",
           "global_row_budgets", "layer_damping"]


@dataclass
class LayerRecord:
    """One layer's outcome: sizes, budget, reconstruction error after the refit (and of the method's own
    weights when it has them), Σ E_i, Σ bounds, the relative gap, the share of rows proven optimal, seconds."""

    name: str
    d_out: int
    d_in: int
    kept: int
    error: float
    objective: float
    bound: float | None
    gap: float | None
    rows_proven: float
    seconds: float
    method_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def layer_rows(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The layer's weight as rows (d_out, d_in): Linear as is, Conv2d flattened, GPT-2 Conv1D transposed."""
    w = module.weight.detach()
    return w.T if transposed else w.reshape(w.shape[0], -1)


def _write_rows(module: nn.Module, transposed: bool, rows: np.ndarray) -> None:
    w = module.weight
    new = torch.from_numpy(rows).to(dtype=w.dtype, device=w.device)
    with torch.no_grad():
        w.copy_(new.T if transposed else new.reshape(w.shape))


def layer_damping(H: np.ndarray, rel_damping: float = 0.01) -> float:
    """λ = δ · mean(diag H) (δ = ``rel_damping``; δ itself when H is zero)."""
    return rel_damping * float(np.mean(np.diag(H))) or rel_damping


def reconstruction_error(W: np.ndarray, V: np.ndarray, H: np.ndarray) -> float:
    """Σ_i (v_i − w_i)ᵀ H (v_i − w_i) for rows W, V (d_out, d_in)."""
    D = V - W
    return float(np.einsum("oi,ij,oj->", D, H, D))


def _solve_rows(problems: list[BlockProblem], solver: Any, H: np.ndarray, time_limit: float | None,
                certify_time: float | None = None, pool: Any = None,
                desc: str = "rows") -> tuple[list[np.ndarray], list[float | None], list[Any], float]:
    """Every row of a layer by ``solver`` on the executor ``pool`` (:mod:`engine.executor`; None: this
    process), each answer checked like ``solve_block``'s (size, pattern, claims, bound;
    :func:`engine.solve.check_result`) and certified by the dual bound at its residual, tightened within
    ``certify_time`` (:mod:`engine.certificate`), where it ran; then its E(S) re-scored by one batched refit
    for all rows (:func:`engine.update.shared_factor_update`, equal to ``optimal_update``). Returns
    (supports, bounds, refit updates, seconds spent on the certificates)."""
    from .solve import check_result

    pool = make_executor(pool)
    options = [SolveOptions(time_limit=time_limit, memo=obj.UpdateMemo(), certify_time=certify_time)
               for _ in problems]
    results = pool.solve(solver, problems, options, desc, show=False if len(problems) < 2 else None)
    supports = [r.support for r in results]
    updates = shared_factor_update(problems, supports, H)
    for p, r, u in zip(problems, results, updates):
        r.weights = u.weights
        check_result(p, r, solver, objective=u.objective, residual=u.residual, certify_time=certify_time)
    cert_seconds = float(sum(r.extra.get("certificate_seconds", 0.0) for r in results))
    return supports, [r.bound for r in results], updates, cert_seconds


def global_row_budgets(model: nn.Module, names: Sequence[str], batches: list, sparsity: float,
                       rel_damping: float = 0.01, grams: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """k for every row of every layer in ``names``: the exact loss-curve knapsack (:mod:`engine.budget`) over
    all rows of all layers, keeping round((1 − sparsity) · Σ d_out·d_in) weights. Layers' errors are in
    different units (each layer's output scale), so each row's curve is divided by its layer's dense output
    energy Σ_i w_iᵀ H w_i (a relative error; E scales with X² and λ alike, so the row's problem takes the
    factor X/√energy and λ/energy). Every H comes from the model as given (budgets are set before any layer
    is pruned); ``grams`` (module name → :func:`engine.calibration.layer_hessians` entry) are those H when the
    caller already has them."""
    from .budget import loss_curve_allocation

    layers, _ = check_layers(model, names, pattern=None, allocation="uniform", method="magnitude",
                             solver_params=None)
    if grams is None:
        grams = layer_hessians(model, [(m, mod) for m, mod, _ in layers], batches)
    rows: list[BlockProblem] = []
    owners: list[str] = []
    for pname, (mname, module, transposed) in zip(names, layers):
        H = grams[mname].hessian
        W = layer_rows(module, transposed).double().cpu().numpy()
        energy = float(np.einsum("oi,ij,oj->", W, H, W)) or 1.0
        lam = layer_damping(H, rel_damping)
        template = BlockProblem(W[0], 0, lam / energy, factor=eigen_factor(H) / np.sqrt(energy))
        rows += [template.with_weights(W[i]) for i in range(W.shape[0])]
        owners += [pname] * W.shape[0]
    ks = loss_curve_allocation(rows, int(round((1 - sparsity) * sum(p.n for p in rows)))).n_keep
    out: dict[str, list[int]] = {}
    for pname, k in zip(owners, ks):
        out.setdefault(pname, []).append(int(k))
    return out


def _row_budgets(rows: list[BlockProblem], n_keep: int, allocation: str) -> list[int]:
    """k_i per row with Σ k_i = n_keep (see :func:`prune_layerwise`)."""
    from formulations.allocation import allocate_global

    if allocation == "magnitude":
        return allocate_global([np.abs(p.weights) for p in rows], n_keep)
    if allocation == "obs":
        from .solvers.woodfisher import obs_scores

        return allocate_global([obs_scores(p) for p in rows], n_keep)
    raise invalid_option("allocation", "prune_layerwise()", "uniform, magnitude, obs or loss_curve", repr(allocation))


def check_layers(model: nn.Module, names: Sequence[str], *, pattern: tuple[int, int] | None, allocation: str,
                 method: Any, solver_params: dict[str, Any] | None, where: str = "prune_layerwise()",
                 names_argument: str = "names") -> tuple[list[tuple[str, nn.Module, bool]], Any]:
    """Every check of a layer-wise run that needs no data, before any work (the API and ``cbs prune`` share
    it): each name is the weight of a layer whose inputs can be formed, the allocation is known and uniform
    under a pattern, the method is ``sparsegpt`` or an installed solver (one that honours N:M under a
    pattern), and M divides every layer's d_in. Returns ((module name, module, transposed) per name, the
    solver or None for sparsegpt)."""
    from .hub import is_transposed_linear

    if allocation not in ("uniform", "magnitude", "obs", "loss_curve"):
        raise invalid_option("allocation", where, "uniform, magnitude, obs or loss_curve", repr(allocation))
    if pattern is not None and allocation != "uniform":
        raise invalid_option("allocation", where, "uniform with an N:M pattern (it fixes every row's count)",
                             repr(allocation))
    owner = {id(m.weight): (n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                                 nn.Parameter)}
    params = dict(model.named_parameters())
    layers = []
    for name in names:
        if name not in params or id(params[name]) not in owner:
            raise invalid_option(names_argument, where, "weights of Linear, Conv2d or GPT-2 Conv1D layers",
                                 repr(name))
        mname, module = owner[id(params[name])]
        check_unfoldable(mname, module)
        transposed = is_transposed_linear(module)
        d_in = layer_rows(module, transposed).shape[1]
        if pattern is not None and d_in % pattern[1]:
            raise invalid_option("pattern", where, f"N:M with M dividing every layer's d_in, its input size "
                                 f"({name}: {d_in})", f"{pattern[0]}:{pattern[1]}")
        layers.append((mname, module, transposed, d_in))
    solver = None
    if getattr(method, "name", method) != "sparsegpt":
        from .solvers.registry import pattern_solvers

        solver = get_solver(method, **(solver_params or {}))
        if hasattr(solver, "ensure_available"):
            solver.ensure_available()
        if pattern is not None and not getattr(solver.capabilities, "patterns", False):
            raise invalid_option("method", where, f"sparsegpt or a solver that honours N:M patterns "
                                 f"({', '.join(pattern_solvers())})", repr(getattr(method, "name", method)))
        largest = max(d for *_, d in layers)
        cap = getattr(solver.capabilities, "max_size", None)
        if cap is not None and largest > cap:
            raise invalid_option("method", where, f"a solver that accepts rows of {largest} weights (this one "
                                 f"takes at most {cap})", repr(getattr(method, "name", method)))
    return [layer[:3] for layer in layers], solver


def prune_layerwise(model: nn.Module, names: Sequence[str], calibration: Iterable[Any], *,
                    sparsity: float | None = None, pattern: tuple[int, int] | None = None, method: Any = "sparsegpt",
                    sequential: bool = True, rel_damping: float = 0.01, time_limit: float | None = None,
                    solver_params: dict[str, Any] | None = None, block: int = 128, refit: bool = True,
                    allocation: str = "uniform", row_budgets: dict[str, Sequence[int]] | None = None,
                    certify_time: float | None = None, on_layer: Callable[[LayerRecord], None] | None = None,
                    executor: Any = None, workers: int = 1,
                    ray_address: str | None = None, resume_from: LayerProgress | None = None,
                    on_progress: Callable[[LayerProgress], None] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], list[LayerRecord]]:
    """Prune ``names`` (weight parameter names) of ``model`` in place, layer by layer; returns (kept masks by
    parameter name, one :class:`LayerRecord` per layer). ``calibration``: a re-iterable of input batches (or
    (inputs, targets) pairs). ``sparsity`` (uniform per row) or ``pattern`` (N, M) sets the budget. ``refit``:
    the kept weights get the closed-form refit; without it they keep their values (masking), or for
    ``sparsegpt`` its own compensated weights (the method as published). Records report the objective and
    the reconstruction error of the weights written, and the bound of the support. ``allocation`` splits a
    layer's budget K = round((1 − sparsity) · d_out · d_in) over its rows: ``uniform`` (the same k in every row,
    the layer-wise convention), ``magnitude`` or ``obs`` (one threshold on |w| or on the OBS score over the
    layer); ``loss_curve`` instead splits the whole budget over all rows of all layers by the exact knapsack
    over their relative error curves (:func:`global_row_budgets`), so layers get different sparsities.
    SparseGPT picks its own per-row counts.
    ``row_budgets`` (by parameter name, one k per row, e.g. from a budget across layers) replaces the
    allocation for the layers it names (unstructured, per-row solvers only). ``certify_time``: the budget of
    each row's certificate (``SolveOptions.certify_time``; :mod:`engine.certificate`).
    ``resume_from``: a :class:`engine.resume.LayerProgress` of this run (its checkpoint): its layers are not
    pruned again, their weights are written after what is computed up front from the model as given (the dense
    Hessians without ``sequential``, the ``loss_curve`` budgets), so the run continues as if never stopped.
    ``on_progress``: called after every layer with the run's :class:`~engine.resume.LayerProgress`."""
    where = "prune_layerwise()"
    if pattern is None and (sparsity is None or not 0 <= sparsity < 1):
        raise invalid_option("sparsity", where, "a number in [0, 1) (or give pattern)", sparsity)
    if not 0 < rel_damping < 1e3:
        raise invalid_option("rel_damping", where, "a number in (0, 1000)", rel_damping)
    check_callback(on_progress, "on_progress", where, "a LayerProgress")
    if resume_from is not None and not isinstance(resume_from, LayerProgress):
        raise invalid_option("resume_from", where, "None or a LayerProgress", type(resume_from).__name__)
    certify_time = option("certify_time").check(certify_time, where)  # the option table's one definition
    pool = make_executor(executor, workers, ray_address, where)  # connects to Ray now: before any work
    batches = list(calibration)
    if not batches:
        raise invalid_option("calibration", where, "at least one batch of calibration inputs", "none")
    layers, solver = check_layers(model, names, pattern=pattern, allocation=allocation, method=method,
                                  solver_params=solver_params)
    shapes = {pname: layer_rows(module, transposed).shape for pname, (_, module, transposed) in zip(names, layers)}
    for name, ks in (row_budgets or {}).items():
        shape = shapes.get(name)
        if shape is None or pattern is not None or solver is None or len(ks) != shape[0] or \
                any(not 0 <= int(k) <= shape[1] for k in ks):
            raise invalid_option("row_budgets", where, "one k in [0, d_in] per row of a pruned layer, unstructured, "
                                 "with a per-row solver", f"{len(ks)} budgets for {name!r}")
    dense = None if sequential else layer_hessians(model, [(m, mod) for m, mod, _ in layers], batches)
    if allocation == "loss_curve" and pattern is None and solver is not None and row_budgets is None:
        row_budgets = global_row_budgets(model, names, batches, sparsity, rel_damping, grams=dense)
    masks, records = {}, []
    if resume_from is not None:  # the layers done, written after everything computed from the dense model
        masks, records = resume_from.restore(model, list(names))
    for pname, (mname, module, transposed) in zip(names, layers):
        if pname in masks:
            continue
        start = time.perf_counter()
        gram = dense[mname] if dense is not None else layer_hessian(model, mname, module, batches)
        H = gram.hessian
        W = layer_rows(module, transposed).double().cpu().numpy()
        d_out, d_in = W.shape
        lam = layer_damping(H, rel_damping)
        k = pattern_keep(d_in, pattern) if pattern is not None else int(round((1 - sparsity) * d_in))
        X = eigen_factor(H)  # XᵀX = H: one factor for every row of the layer
        template = BlockProblem(W[0], k, lam, factor=X, pattern=pattern)
        base = [template.with_weights(W[i], f"{mname}[{i}]") for i in range(d_out)]
        if row_budgets is not None and pname in row_budgets:
            base = [p.with_n_keep(int(kb)) for p, kb in zip(base, row_budgets[pname])]
        elif allocation != "uniform" and pattern is None and solver is not None:
            ks = _row_budgets(base, int(round((1 - sparsity) * d_out * d_in)), allocation)
            base = [p.with_n_keep(int(kb)) for p, kb in zip(base, ks)]
        extra: dict[str, Any] = {"lambda": lam, "calibration_rows": gram.rows, "refit": refit}
        method_error = None
        if solver is None:
            Hd = H + lam * np.eye(d_in)
            t_own = time.perf_counter()
            own, kept = sparsegpt(W, Hd, sparsity if sparsity is not None else 0.5, pattern, block=block)
            per_row = (time.perf_counter() - t_own) / max(d_out, 1)
            method_error = reconstruction_error(W, own, H)
            problems = [p if pattern is not None else p.with_n_keep(int(kept[i].sum())) for i, p in enumerate(base)]
            supports = list(kept)
            updates = shared_factor_update(problems, supports, H)
            certs = [tighten_bound(p, S, u.objective, u.residual, u.weights, certify_time, per_row)
                     for p, S, u in zip(problems, supports, updates)]
            bounds, cert_seconds = [c.bound for c in certs], float(sum(c.seconds for c in certs))
        else:
            problems = base
            supports, bounds, updates, cert_seconds = _solve_rows(problems, solver, H, time_limit, certify_time,
                                                                  pool, f"rows ({mname})")
            if pool.name == "ray":
                extra["ray"] = dict(pool.last)  # tasks, bytes shared once and bytes of payloads: what moved
        extra["certificate_seconds"] = cert_seconds
        if refit:
            V = np.stack([u.weights for u in updates])
            values = [u.objective for u in updates]
        else:
            V = own if solver is None else np.where(np.stack(supports), W, 0.0)
            values = [obj.quadratic_model(p, V[i]) for i, p in enumerate(problems)]
        objective = float(sum(values))
        bound = None if any(b is None for b in bounds) else float(sum(bounds))
        gaps = [obj.relative_gap(v, b) for v, b in zip(values, bounds)]
        proven = float(np.mean([g is not None and g <= 1e-9 for g in gaps]))
        _write_rows(module, transposed, V)
        kept_mask = torch.from_numpy(np.stack(supports))
        weight = module.weight
        masks[pname] = (kept_mask.T if transposed else kept_mask.reshape(weight.shape)).to(torch.bool)
        record = LayerRecord(name=pname, d_out=d_out, d_in=d_in, kept=int(kept_mask.sum()),
                             error=reconstruction_error(W, V, H), objective=objective, bound=bound,
                             gap=obj.relative_gap(objective, bound), rows_proven=proven,
                             seconds=time.perf_counter() - start, method_error=method_error, extra=extra)
        records.append(record)
        if on_layer is not None:
            on_layer(record)
        if on_progress is not None:
            on_progress(LayerProgress.of(model, masks, records))
    return masks, records
