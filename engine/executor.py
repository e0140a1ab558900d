"""Executors: run a list of independent block solves, in this process or in forked worker processes.

The driver hands over (solver, problems, options) and gets the results back in block order; it does not know
where they ran. Forked workers share the problems' arrays copy-on-write instead of receiving pickled copies.
"""

from __future__ import annotations

import time
from typing import Any

from formulations.problem import BlockProblem

from .options import SolveOptions
from .progress import progress
from .result import SolveResult
from .solvers.base import SubsetSolver

__all__ = ["solve_blocks"]

#: (solver, problems, options) of the pool's current job: forked workers inherit it, nothing is pickled
_POOL_JOB: tuple[Any, list[BlockProblem], list[SolveOptions]] | None = None


def _pool_solve(i: int) -> tuple[int, SolveResult, float]:
    import torch

    solver, problems, options = _POOL_JOB  # type: ignore[misc]
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = solver.solve(problems[i], options[i])
    return i, result, time.perf_counter() - start


def solve_blocks(solver: SubsetSolver, problems: list[BlockProblem], options: list[SolveOptions], workers: int = 1,
                 desc: str = "select", show: bool | None = None) -> list[SolveResult]:
    """Solve every block, in this process or in ``workers`` forked processes (results in block order, each
    with its wall time)."""
    global _POOL_JOB
    results: list[SolveResult | None] = [None] * len(problems)
    seconds = [0.0] * len(problems)
    if workers > 1 and len(problems) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _POOL_JOB = (solver, problems, options)
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(problems)), mp_context=mp.get_context("fork")) as pool:
                order = sorted(range(len(problems)), key=lambda i: -problems[i].n)  # largest first
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
