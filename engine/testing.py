"""Conformance checks for solver plug-ins: run :func:`check_solver` on your solver before you ship it.

    from engine.testing import check_solver
    report = check_solver(MySolver())          # raises AssertionError listing every violation
    print(report)                               # what was checked, on how many problems

The checks use seeded random problems small enough for brute force (the oracle), well- and
ill-conditioned, with and without a mean gradient, and budgets k ∈ {1, n/2, n − 1}:

- the answer passes the engine's contract (|support| = k, objective re-scored, bound ≤ objective,
  ``optimal`` only from exact solvers) — via :func:`engine.solve.solve_block`;
- the objective is ≥ the brute-force optimum; an exact solver that says ``optimal`` equals it;
- a returned bound is ≤ the brute-force optimum;
- the same seed gives the same support;
- a warm start is honoured by exact solvers (never worse than it);
- a tiny time limit returns a feasible answer without raising.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np

from formulations.objective import support_objective
from formulations.problem import BlockProblem

from .options import SolveOptions
from .result import Status
from .solve import UnprovenOptimalityWarning, solve_block
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver

__all__ = ["check_solver", "ConformanceReport", "conformance_problems"]

TOL = 1e-7


@dataclass
class ConformanceReport:
    """What :func:`check_solver` checked and found."""

    solver: str
    problems: int = 0
    checks: int = 0
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "conforms" if not self.failures else f"{len(self.failures)} failures"
        return f"solver '{self.solver}': {self.checks} checks on {self.problems} problems, {state}"


def conformance_problems(n: int = 8, seeds: tuple[int, ...] = (0, 1)) -> list[BlockProblem]:
    """Seeded tiny problems: well-conditioned (N = 4n, λ = 0.1), ill-conditioned (N = n/2, correlated, λ = 1e-4),
    with and without g, k ∈ {1, n/2, n − 1}."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for kind in ("well", "ill"):
            if kind == "well":
                X, lam = rng.normal(size=(4 * n, n)) / np.sqrt(4 * n), 0.1
            else:
                base = rng.normal(size=(max(1, n // 2), 2))
                X = base @ rng.normal(size=(2, n)) + 0.05 * rng.normal(size=(max(1, n // 2), n))
                lam = 1e-4
            w = rng.normal(size=n)
            for k in (1, n // 2, n - 1):
                g = 0.1 * rng.normal(size=n) if (k + seed) % 2 else None
                out.append(BlockProblem(w, k, lam, factor=X, gradient=g, label=f"{kind}-s{seed}-k{k}"))
    return out


def _brute(problem: BlockProblem) -> float:
    best = np.inf
    for kept in itertools.combinations(range(problem.n), problem.n_keep):
        s = np.zeros(problem.n, dtype=bool)
        s[list(kept)] = True
        best = min(best, support_objective(problem, s))
    return best


def check_solver(solver: str | SubsetSolver, n: int = 8, seeds: tuple[int, ...] = (0, 1), raise_on_failure: bool = True) -> ConformanceReport:
    """Run the conformance checks on ``solver`` (a name or an instance); see the module docstring."""
    inst = get_solver(solver)
    report = ConformanceReport(solver=getattr(inst, "name", type(inst).__name__))
    exact = bool(inst.capabilities.exact)

    def check(ok: bool, message: str) -> None:
        report.checks += 1
        if not ok:
            report.failures.append(message)

    for p in conformance_problems(n, seeds):
        report.problems += 1
        opt = _brute(p)
        scale = max(1.0, abs(opt))
        try:
            r = solve_block(p, inst, SolveOptions(seed=3))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised one by one
            check(False, f"{p.label}: solve raised {type(exc).__name__}: {exc}")
            continue
        check(r.objective >= opt - TOL * scale, f"{p.label}: objective {r.objective:.10g} below the optimum {opt:.10g}")
        if r.status == Status.OPTIMAL:
            check(abs(r.objective - opt) <= 1e-6 * scale, f"{p.label}: 'optimal' {r.objective:.10g} != optimum {opt:.10g}")
        if r.bound is not None:
            check(r.bound <= opt + TOL * scale, f"{p.label}: bound {r.bound:.10g} above the optimum {opt:.10g}")
        again = solve_block(p, inst, SolveOptions(seed=3))
        check(np.array_equal(again.support, r.support), f"{p.label}: same seed, different support")
        if exact and inst.capabilities.warm_start:
            warm = np.zeros(p.n, dtype=bool)
            warm[np.argsort(-np.abs(p.weights))[: p.n_keep]] = True
            w_obj = support_objective(p, warm)
            rw = solve_block(p, inst, SolveOptions(seed=3), warm_start=warm)
            check(rw.objective <= w_obj + TOL * scale, f"{p.label}: worse than its warm start")
        try:
            with warnings.catch_warnings():  # stopping early is what this probe asks for
                warnings.simplefilter("ignore", UnprovenOptimalityWarning)
                rt = solve_block(p, inst, SolveOptions(seed=3, time_limit=1e-3))
            check(int(rt.support.sum()) == p.n_keep, f"{p.label}: time limit gave an infeasible support")
        except Exception as exc:  # noqa: BLE001
            check(False, f"{p.label}: a time limit raised {type(exc).__name__}: {exc}")
    if raise_on_failure and report.failures:
        raise AssertionError(f"{report}:\n  " + "\n  ".join(report.failures))
    return report
