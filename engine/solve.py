"""Solve one block under the contract and check the answer (DESIGN.md §3).

:func:`solve_block` is what the pruner, the CLI and the tests call. It validates, calls the solver,
re-scores the support with ``formulations.objective`` (or with an objective the caller computed with
the same math, e.g. the torch update), checks the answer, and attaches the free dual certificate.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np

from formulations import objective as obj
from formulations.problem import BlockProblem

from .errors import InvalidOptionError, SolverError
from .options import SolveOptions
from .result import SolveResult, Status, Termination
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver

__all__ = ["solve_block", "check_result", "UnprovenOptimalityWarning"]

#: relative tolerance for "the solver's objective agrees with the re-score" and "bound ≤ objective"
RTOL = 1e-6


class UnprovenOptimalityWarning(UserWarning):
    """An exact solver stopped (time or iteration limit) before proving optimality."""


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RTOL * max(1.0, abs(scale)) + 1e-9 * max(1.0, abs(scale))


def check_result(
    problem: BlockProblem,
    result: SolveResult,
    solver: SubsetSolver,
    objective: float | None = None,
    residual: np.ndarray | None = None,
    certify: bool = True,
    memo: obj.UpdateMemo | None = None,
) -> SolveResult:
    """Check and complete a solver's answer in place; returns it.

    - |support| = k, else SolverError;
    - re-score E(S) (``objective`` if the caller already computed it with the same math); a solver that
      reported a finite objective disagreeing beyond ``RTOL`` is a SolverError (catches scaling bugs);
    - ``bound`` ≤ objective (within tolerance), else SolverError;
    - ``Status.OPTIMAL`` only from exact solvers;
    - with ``certify``: bound = max(solver bound, dual bound at the support's residual); gap filled.

    ``memo``: the block's :class:`~formulations.objective.UpdateMemo`; a re-score finds there the solve
    the solver already made of its final support.
    """
    name = getattr(solver, "name", type(solver).__name__)
    support = np.asarray(result.support)
    if support.dtype != bool or support.shape != (problem.n,):
        try:
            support = obj.as_support(problem, support, check_size=False)
        except ValueError as exc:
            raise SolverError(f"Solver '{name}' returned an invalid support: {exc}") from None
    if int(support.sum()) != problem.n_keep:
        raise SolverError(
            f"Solver '{name}' returned a support of size {int(support.sum())}; the block '{problem.label}' needs "
            f"exactly n_keep = {problem.n_keep}."
        )
    result.support = support
    if objective is None:
        sol = obj.optimal_update(problem, support, memo)
        objective, residual = sol.objective, sol.residual
        if result.weights is None:
            result.weights = sol.weights
    claimed = result.objective
    if claimed is not None and math.isfinite(claimed) and not _close(claimed, objective, objective):
        raise SolverError(
            f"Solver '{name}' reported objective {claimed:.10g} for block '{problem.label}', but the engine's "
            f"re-score E(S) is {objective:.10g}: a scaling or formulation bug in the solver."
        )
    result.objective = float(objective)
    if result.bound is not None:
        if not math.isfinite(result.bound) and result.bound != -math.inf:
            raise SolverError(f"Solver '{name}' returned a non-finite bound {result.bound}.")
        if result.bound > objective + RTOL * max(1.0, abs(objective)):
            raise SolverError(
                f"Solver '{name}' returned bound {result.bound:.10g} above the objective {objective:.10g} of its "
                f"own support for block '{problem.label}': the bound is not valid."
            )
    if result.status == Status.OPTIMAL and not solver.capabilities.exact:
        raise SolverError(f"Solver '{name}' is not exact and may not return status 'optimal'.")
    if certify:
        lb = obj.dual_bound(problem, alpha=residual) if residual is not None else obj.dual_bound(problem, support=support)
        result.bound = lb if result.bound is None or not math.isfinite(result.bound) else max(result.bound, lb)
        result.bound = min(result.bound, objective)  # rounding can put it a hair above
    result.gap = obj.relative_gap(result.objective, result.bound)
    if not result.solver:
        result.solver = name
    return result


def solve_block(
    problem: BlockProblem,
    solver: str | SubsetSolver = "magnitude",
    options: SolveOptions | None = None,
    warm_start: np.ndarray | None = None,
    **params,
) -> SolveResult:
    """Solve one block and return a checked :class:`SolveResult` (objective re-scored, gap certified).

    The solver and the re-score share ``options.memo`` (a fresh :class:`~formulations.objective.UpdateMemo`
    for this call when None), so the final support is solved once."""
    if not isinstance(problem, BlockProblem):
        raise InvalidOptionError(
            f"The 'problem' argument of solve_block() must be a BlockProblem. Got {type(problem).__name__}."
        )
    options = options or SolveOptions()
    if options.memo is None:
        options = dataclasses.replace(options, memo=obj.UpdateMemo())
    inst = get_solver(solver, **params)
    if hasattr(inst, "ensure_available"):
        inst.ensure_available()
    cap = inst.capabilities
    if cap.max_size is not None and problem.n > cap.max_size:
        raise InvalidOptionError(
            f"Solver '{inst.name}' accepts blocks of at most {cap.max_size} weights; block '{problem.label}' has "
            f"n = {problem.n}. Use smaller blocks (--block-size) or another solver."
        )
    if warm_start is not None:
        warm_start = obj.as_support(problem, warm_start)
    start = time.perf_counter()
    result = inst.solve(problem, options, warm_start=warm_start)
    elapsed = time.perf_counter() - start
    if not result.wall_time:
        result.wall_time = elapsed
    result = check_result(problem, result, inst, certify=options.certify, memo=options.memo)
    if cap.exact and result.status != Status.OPTIMAL and result.termination in (
        Termination.TIME_LIMIT,
        Termination.ITERATION_LIMIT,
    ):
        gap = "unknown" if result.gap is None else f"{100 * result.gap:.3g} %"
        warnings.warn(
            f"Solver '{inst.name}' stopped ({result.termination.value}) before proving optimality on block "
            f"'{problem.label}'; gap {gap}.",
            UnprovenOptimalityWarning,
            stacklevel=2,
        )
    return result
