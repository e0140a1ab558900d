"""``cbs solve FOLDER``: every block problem of a folder (``*.npz``, as ``cbs export-blocks`` writes them),
solved on one executor (:mod:`engine.executor`: this process, forked processes or a Ray cluster).

Each block is checked, re-scored and certified where it runs, exactly as ``cbs solve FILE`` does for one
(:func:`engine.executor.solve_task`). Without ``solver`` each block gets the solver :mod:`engine.autosolve`
picks for it (blocks that get the same one are solved together), with a 60 s limit per block unless a time
limit is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InvalidOptionError
from .executor import make_executor
from .options import SolveOptions
from .problem_io import load_problem

__all__ = ["problem_files", "solve_folder"]

#: the time limit per block when the solver is picked automatically (an exact search may not end)
AUTO_TIME_LIMIT = 60.0


def problem_files(folder: str | Path, where: str = "solve_folder()") -> list[Path]:
    """The ``.npz`` files of ``folder``, sorted by name; a clear error when there is none."""
    path = Path(folder)
    arg = "folder" if where.endswith(")") else "problem"
    if not path.is_dir():
        raise InvalidOptionError(f"The '{arg}' argument of {where} must be an existing folder. Got '{path}'.")
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise InvalidOptionError(f"The '{arg}' argument of {where} must be a folder holding .npz problem files "
                                 f"(cbs export-blocks writes them). Got '{path}', which holds none.")
    return files


def solve_folder(folder: str | Path, solver: str | None = None, *, params: dict[str, Any] | None = None,
                 time_limit: float | None = None, certify_time: float | None = None, seed: int = 0,
                 executor: Any = None, workers: int = 1, ray_address: str | None = None,
                 where: str = "solve_folder()", show: bool | None = None) -> list[dict[str, Any]]:
    """Solve every problem file of ``folder``; one summary per file, in name order: the result's summary
    (:meth:`engine.result.SolveResult.summary`: solver, objective, bound, gap, status, termination, times)
    with ``problem`` (the path), ``label``, ``support`` (kept indices), ``N`` and ``lam``.

    ``solver`` (a registered name; ``params`` its constructor parameters) or None (picked per block);
    ``time_limit`` and ``certify_time`` per block (:class:`engine.options.SolveOptions`); ``executor``,
    ``workers``, ``ray_address``: where the blocks run (:func:`engine.executor.make_executor`, checked and
    connected before any problem is read)."""
    from .autosolve import choose_solver
    from .settings import option
    from .solvers.registry import get_solver

    pool = make_executor(executor, workers, ray_address, where)
    certify_time = option("certify_time").check(certify_time, where)
    options = SolveOptions(time_limit=time_limit, seed=seed, certify_time=certify_time)  # checks both
    files = problem_files(folder, where)
    problems = [load_problem(f) for f in files]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        if solver is None:
            name, chosen, _ = choose_solver(p)
            chosen = {**chosen, **(params or {})}
        else:
            name, chosen = solver, dict(params or {})
        groups.setdefault((name, tuple(sorted(chosen.items()))), []).append(i)
    summaries: list[dict[str, Any] | None] = [None] * len(problems)
    for (name, chosen), members in groups.items():
        inst = get_solver(name, **dict(chosen))
        if hasattr(inst, "ensure_available"):
            inst.ensure_available()
        cap = inst.capabilities.max_size
        for i in members:
            if cap is not None and problems[i].n > cap:
                raise InvalidOptionError(f"Solver '{inst.name}' accepts blocks of at most {cap} weights; "
                                         f"{files[i]} has n = {problems[i].n}. Use another solver.")
        limit = time_limit if time_limit is not None or solver is not None else AUTO_TIME_LIMIT
        opts = SolveOptions(time_limit=limit, seed=options.seed, certify_time=certify_time)
        results = pool.solve(inst, [problems[i] for i in members], [opts] * len(members), f"solve ({inst.name})",
                             show)
        for i, r in zip(members, results):
            p = problems[i]
            summaries[i] = {**r.summary(), "problem": str(files[i]), "label": p.label,
                            "support": r.kept.tolist(), "N": p.n_samples, "lam": p.damping}
    return summaries  # type: ignore[return-value]
