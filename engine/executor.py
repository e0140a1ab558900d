"""Executors: run a list of independent block solves, in this process or in forked worker processes.

The driver hands over (solver, problems, options) and gets the results back in block order; it does not know
where they ran. Forked workers share the problems' arrays copy-on-write instead of receiving pickled copies.

Every call goes through :func:`engine.solve.call_solver` (in the worker, for forked ones): a solver that raises
or returns no SolveResult stops the run with one :class:`~engine.solve.SolverCallError` naming the solver and
the block, and each result carries its time-limit overshoot, which is judged here, in the calling process
(:func:`engine.solve.note_overshoot`: one warning per solver per process, whichever worker overran).
"""

from __future__ import annotations

from typing import Any

from formulations.problem import BlockProblem

from .options import SolveOptions
from .progress import progress
from .result import SolveResult
from .solve import call_solver, note_overshoot
from .solvers.base import SubsetSolver

__all__ = ["solve_blocks"]

#: (solver, problems, options) of the pool's current job: forked workers inherit it, nothing is pickled
_POOL_JOB: tuple[Any, list[BlockProblem], list[SolveOptions]] | None = None


def _pool_solve(i: int) -> tuple[int, SolveResult]:
    import torch

    solver, problems, options = _POOL_JOB  # type: ignore[misc]
    torch.set_num_threads(1)
    # a SolverCallError (one line, picklable) comes back instead of whatever the plug-in raised
    return i, call_solver(solver, problems[i], options[i])


def solve_blocks(solver: SubsetSolver, problems: list[BlockProblem], options: list[SolveOptions], workers: int = 1,
                 desc: str = "select", show: bool | None = None) -> list[SolveResult]:
    """Solve every block, in this process or in ``workers`` forked processes (results in block order, each
    with its wall time and time-limit overshoot)."""
    global _POOL_JOB
    results: list[SolveResult | None] = [None] * len(problems)
    if workers > 1 and len(problems) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _POOL_JOB = (solver, problems, options)
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(problems)), mp_context=mp.get_context("fork")) as pool:
                order = sorted(range(len(problems)), key=lambda i: -problems[i].n)  # largest first
                for i, result in progress(pool.map(_pool_solve, order), total=len(order), desc=desc, enabled=show):
                    results[i] = result
                    note_overshoot(solver, problems[i], result)
        finally:
            _POOL_JOB = None
    else:
        for i in progress(range(len(problems)), total=len(problems), desc=desc, enabled=show):
            results[i] = call_solver(solver, problems[i], options[i])
            note_overshoot(solver, problems[i], results[i])  # type: ignore[arg-type]
    return results  # type: ignore[return-value]
