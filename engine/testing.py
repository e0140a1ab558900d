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
- a tiny time limit (1 ms) returns a feasible answer without raising;
- time limits are honoured: neither that probe nor a 0.2 s limit on a harder block (n = 40, k = 20, or the
  solver's ``max_size``) may run past the limit by more than the engine's grace
  (:func:`engine.solve.time_limit_grace`: max(1 s, 10 % of the limit)). After the first overrun the
  remaining time-limit probes are skipped, so a solver that sleeps costs the checker one sleep.

Run-time claims are also refuted by :func:`engine.solve.solve_block` itself (a better support than an
``optimal`` answer or a bound is a :class:`~engine.solve.SolverAnswerError`), and reported here as such.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np

from formulations.objective import support_objective
from formulations.problem import BlockProblem

from .errors import InvalidOptionError
from .options import SolveOptions
from .result import SolveResult, Status
from .solve import (
    TimeLimitExceededWarning, UnprovenOptimalityWarning, forget_overshoot_warnings, overshoot_warned, solve_block,
    time_limit_grace,
)
from .solvers.base import SubsetSolver
from .solvers.registry import get_solver

__all__ = ["check_solver", "ConformanceReport", "conformance_problems"]

TOL = 1e-7
#: the time limits of the probes (seconds): a tiny one on every problem, a real one on a harder block
TINY_LIMIT, PROBE_LIMIT = 1e-3, 0.2


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


def _timed(problem: BlockProblem, inst: SubsetSolver, limit: float) -> tuple[SolveResult, float]:
    """(solve_block's result under ``limit``, the seconds the solver's call took by the engine's clock: the
    engine's own checks after it are not the solver's time); the warnings a probe provokes are its point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        warnings.simplefilter("ignore", TimeLimitExceededWarning)
        result = solve_block(problem, inst, SolveOptions(seed=3, time_limit=limit))
    return result, limit + (result.overshoot or 0.0)


def _probe_problem(max_size: int | None) -> BlockProblem:
    """A block no exact solver proves in 0.2 s (k = n/2, N = 2n Gaussian rows, λ = 1e-2), n = 40 or max_size."""
    n = min(40, max_size or 40)
    rng = np.random.default_rng(7)
    X = rng.normal(size=(2 * n, n)) / np.sqrt(2 * n)
    return BlockProblem(rng.normal(size=n), n // 2, 1e-2, factor=X, label=f"time-limit-n{n}")


def check_solver(solver: str | SubsetSolver, n: int = 8, seeds: tuple[int, ...] = (0, 1), raise_on_failure: bool = True) -> ConformanceReport:
    """Run the conformance checks on ``solver`` (a name or an instance); see the module docstring."""
    inst = get_solver(solver)
    report = ConformanceReport(solver=getattr(inst, "name", type(inst).__name__))
    exact = bool(inst.capabilities.exact)
    warned_before = overshoot_warned(report.solver)
    limits_ok = True

    def check(ok: bool, message: str) -> None:
        report.checks += 1
        if not ok:
            report.failures.append(message)

    def check_limit(label: str, limit: float, elapsed: float) -> None:
        nonlocal limits_ok
        grace = time_limit_grace(limit)
        limits_ok = elapsed <= limit + grace
        check(limits_ok, f"{label}: ignores the time limit: ran {elapsed:.3g} s against {limit:g} s "
                         f"(grace {grace:g} s)")

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
        if not limits_ok:
            continue  # one overrun is proof enough; more probes would only repeat its cost
        try:
            rt, elapsed = _timed(p, inst, TINY_LIMIT)
            check(int(rt.support.sum()) == p.n_keep, f"{p.label}: time limit gave an infeasible support")
            check_limit(p.label, TINY_LIMIT, elapsed)
        except Exception as exc:  # noqa: BLE001
            check(False, f"{p.label}: a time limit raised {type(exc).__name__}: {exc}")
    if limits_ok:
        hard = _probe_problem(inst.capabilities.max_size)
        try:
            rt, elapsed = _timed(hard, inst, PROBE_LIMIT)
            check_limit(hard.label, PROBE_LIMIT, elapsed)
        except InvalidOptionError:
            pass  # the solver declines a block this size (brute force's max_supports): nothing to time
        except Exception as exc:  # noqa: BLE001
            check(False, f"{hard.label}: a time limit raised {type(exc).__name__}: {exc}")
    if not warned_before:
        forget_overshoot_warnings(report.solver)  # the checker's probes do not use up the run's one warning
    if raise_on_failure and report.failures:
        raise AssertionError(f"{report}:\n  " + "\n  ".join(report.failures))
    return report
