"""Executors: where a list of independent block solves runs: in this process, in forked worker processes, or as
tasks on a Ray cluster (:mod:`engine.ray_executor`).

The driver hands over (solver, problems, options) and gets the results back in block order; it does not know
where they ran. Every block runs the same function, :func:`solve_task`, wherever it runs:

    call_solver (the plug-in's answer, or one SolverCallError naming solver and block)
      → check_result (size and pattern checked, E(S) re-scored, claims checked, the certificate tightened
        within ``options.certify_time``: :mod:`engine.certificate`)

so a task returns a support with its objective, bound, gap, status and timings, and an executor changes where
the work runs, never what it computes. A remote task leaves out the weights of the update (the driver's batched
update recomputes them for every block at once) and the certificate travels with the task.

``local``: a loop in this process. ``processes``: a ``ProcessPoolExecutor`` with the fork context; the job
sits in a module global that forked workers inherit, so the problems' arrays are shared copy-on-write instead
of pickled; the largest blocks go first. ``ray``: see :mod:`engine.ray_executor`.

Each result carries its time-limit overshoot, which is judged here, in the calling process
(:func:`engine.solve.note_overshoot`: one warning per solver per process, whichever worker overran).
Progress: blocks done of all, and the block running longest (:class:`engine.progress.ProgressBar`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from formulations.objective import UpdateMemo
from formulations.problem import BlockProblem

from .errors import invalid_option
from .options import SolveOptions
from .progress import ProgressBar
from .result import SolveResult
from .solve import call_solver, check_result, note_overshoot
from .solvers.base import SubsetSolver

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "ProcessExecutor", "make_executor", "solve_task"]

#: the executors by name (the option ``executor``)
EXECUTORS = ("local", "processes", "ray")


def solve_task(solver: SubsetSolver, problem: BlockProblem, options: SolveOptions,
               warm_start: Any = None) -> SolveResult:
    """One block, checked and certified: what every executor runs for every block (module docstring)."""
    if options.memo is None:
        options = dataclasses.replace(options, memo=UpdateMemo())
    result = call_solver(solver, problem, options, warm_start)
    return check_result(problem, result, solver, certify=options.certify, memo=options.memo,
                        certify_time=options.certify_time)


def remote_task(solver: SubsetSolver, problem: BlockProblem, options: SolveOptions,
                warm_start: Any = None) -> tuple[SolveResult, Any]:
    """:func:`solve_task` in a worker: the result without its weights, and the final support's exact update
    (a :class:`~formulations.objective.SupportSolution`: weights and residual) that the check computed there,
    which :func:`remember` puts into the caller's memo so that the driver's batched update reuses it (as it
    does after a local solve) instead of solving it again, possibly in another order of float operations."""
    options = dataclasses.replace(options, memo=UpdateMemo())
    result = solve_task(solver, problem, options, warm_start)
    solution = options.memo.get(problem, result.support)
    result.weights = None
    return result, solution


def remember(problem: BlockProblem, options: SolveOptions, result: SolveResult, solution: Any) -> SolveResult:
    """Put a worker's update of ``result``'s support into the caller's memo (``options.memo``), if any."""
    if solution is not None and options.memo is not None:
        options.memo.put(problem, result.support, solution)
    return result


def slowest_note(running: dict[Any, tuple[str, float]], now: float | None = None) -> str:
    """``"slowest: LABEL 12 s"`` for the task running longest (``running``: key → (label, start time))."""
    if not running:
        return ""
    now = time.monotonic() if now is None else now
    label, start = min(running.values(), key=lambda v: v[1])
    return f"slowest: {label or 'a block'} {now - start:.0f} s"


class Executor:
    """Runs :func:`solve_task` for every block; subclasses say where. ``workers``: how many at once."""

    name = "base"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def solve(self, solver: SubsetSolver, problems: list[BlockProblem], options: list[SolveOptions],
              desc: str = "select", show: bool | None = None, warm_starts: list | None = None) -> list[SolveResult]:
        """The checked results of every block, in block order (``warm_starts``: a support or None per block,
        for solvers that take one)."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """A loop in this process."""

    name = "local"

    def solve(self, solver, problems, options, desc="select", show=None, warm_starts=None):
        results: list[SolveResult] = []
        warm = warm_starts or [None] * len(problems)
        with ProgressBar(len(problems), desc, show) as bar:
            for p, o, w in zip(problems, options, warm):
                if bar.total > 1:
                    bar.status(f"running: {p.label or 'a block'}")
                results.append(solve_task(solver, p, o, w))
                note_overshoot(solver, p, results[-1])
                bar.update()
        return results


#: (solver, problems, options, warm starts) of the pool's current job: forked workers inherit it, nothing is pickled
_POOL_JOB: tuple[Any, list[BlockProblem], list[SolveOptions], list] | None = None


def _pool_solve(i: int) -> tuple[int, tuple[SolveResult, Any]]:
    import torch

    solver, problems, options, warm = _POOL_JOB  # type: ignore[misc]
    torch.set_num_threads(1)
    # an error of ours (one line, picklable) comes back instead of whatever the plug-in raised
    return i, remote_task(solver, problems[i], options[i], warm[i])


class ProcessExecutor(Executor):
    """``workers`` forked processes on this machine (module docstring)."""

    name = "processes"

    def solve(self, solver, problems, options, desc="select", show=None, warm_starts=None):
        if self.workers <= 1 or len(problems) <= 1:
            return LocalExecutor().solve(solver, problems, options, desc, show, warm_starts)
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        global _POOL_JOB
        results: list[SolveResult | None] = [None] * len(problems)
        _POOL_JOB = (solver, problems, options, warm_starts or [None] * len(problems))
        try:
            with ProcessPoolExecutor(max_workers=min(self.workers, len(problems)),
                                     mp_context=mp.get_context("fork")) as pool, \
                    ProgressBar(len(problems), desc, show) as bar:
                order = sorted(range(len(problems)), key=lambda i: -problems[i].n)  # largest first
                pending = {pool.submit(_pool_solve, i): i for i in order}
                running: dict[Any, tuple[str, float]] = {}
                while pending:
                    done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        i, (result, solution) = future.result()
                        pending.pop(future)
                        running.pop(future, None)
                        results[i] = remember(problems[i], options[i], result, solution)
                        note_overshoot(solver, problems[i], result)
                        bar.update()
                    now = time.monotonic()
                    for future, i in pending.items():
                        if future not in running and future.running():
                            running[future] = (problems[i].label, now)
                    bar.status(slowest_note(running, now))
        finally:
            _POOL_JOB = None
        return results  # type: ignore[return-value]


def make_executor(executor: Any = None, workers: int = 1, ray_address: str | None = None,
                  where: str = "make_executor()") -> Executor:
    """The executor named ``executor`` (``local``, ``processes`` or ``ray``; None: ``processes`` when
    ``workers > 1``, else ``local``), or ``executor`` itself when it is an :class:`Executor`. Checked before
    any work: every argument by the option table's definition; ``ray`` imports Ray (else an error naming the
    ``ray`` extra) and joins ``ray_address`` (or the cluster this process is connected to, or starts a local
    one), refusing an address it cannot reach."""
    from .settings import option

    if isinstance(executor, Executor):
        return executor
    kind = option("executor").check(executor, where)
    workers = option("workers").check(workers, where)
    ray_address = option("ray_address").check(ray_address, where)
    if kind is None:
        kind = "processes" if workers > 1 else "local"
    if ray_address is not None and kind != "ray":
        cli = not where.endswith(")")  # the command line names its flags
        raise invalid_option("--ray-address" if cli else "ray_address", where,
                             "given only with --executor ray" if cli else "None unless executor is 'ray'",
                             repr(ray_address))
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "processes":
        return ProcessExecutor(workers)
    from .ray_executor import RayExecutor

    return RayExecutor(workers, ray_address, where)

