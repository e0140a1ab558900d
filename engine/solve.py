"""Solve one block under the contract and check the answer (DESIGN.md §3): plug-ins are checked, not trusted.

:func:`solve_block` is what the CLI and the tests call; the pruner runs the same steps through
:func:`engine.executor.solve_task` (on the run's executor) and :func:`check_result`.

**The call** (:func:`call_solver`). A solver that raises becomes one :class:`SolverCallError` naming the
solver, the block and the error (the original is chained as ``__cause__``); so does a solver that returns
anything but a :class:`SolveResult`. A :class:`CBSError` raised by a solver already is one of our one-line
errors (e.g. ``SolverUnavailableError``) and passes unchanged; ``KeyboardInterrupt`` is not an ``Exception``
and passes untouched.

**Time limits.** The engine's clock around the call gives ``overshoot = max(0, elapsed − T)`` for a limit
T (recorded on the result). Beyond the grace g(T) = max(GRACE_SECONDS, GRACE_FRACTION·T), i.e.
max(1 s, 10 % of T), :func:`note_overshoot` emits a :class:`TimeLimitExceededWarning`, once per solver
name per process (later overruns are logged at INFO).

**The answer** (:func:`check_result`): |support| = k; E(S) re-scored and compared with the solver's value;
bound ≤ E(S); ``optimal`` only from exact solvers; then the solver's claims are *refuted* where the engine
can do it cheaply. A claim is a lower bound L on min_{|T|=k} E(T): the solver's ``bound`` when it gives
one, else E(S) itself when it says ``optimal``. Any support T with E(T) < L − tol, tol =
REFUTE_RTOL·max(|L|, |E(T)|) + 1e-12·E₀ (E₀ = ½‖Xw‖² + ½λ‖w‖² + |gᵀw|, the block's scale), refutes
it (:class:`SolverAnswerError`). Nothing is searched when the engine's own dual bound LB(α) at the
support's residual already proves L (L ≤ LB + tol). The search, sound (only an exact ``optimal_update``
re-score refutes) but incomplete:

- tiny blocks, 2 ≤ min(k, n − k) and C(n, k) ≤ BRUTE_FORCE_MAX: every support (every one the block's
  N:M pattern allows), by the batched :class:`~engine.solvers.branch_and_bound.DenseEvaluator`;
- otherwise one pass over all k(n − k) single swaps of S (exhaustive when min(k, n − k) = 1; under an N:M
  pattern only the swaps inside a group of M, the ones it allows), each scored
  at once by the rank-one formulas of :mod:`engine.solvers.swap`: with A = (X_SᵀX_S + λI)⁻¹,
  v_S = A(X_Sᵀy + λw_S − g_S), r = X_S v_S − y, u_p = X_pᵀr − λw_p + g_p, t = A X_SᵀX_p,
  s = ‖X_p‖² + λ − (X_SᵀX_p)ᵀt, swapping p in and q out changes E by

      Δ(p, q) = −u_p²/(2s) + (v_q + t_q u_p/s)² / (2 (A_qq + t_q²/s)),

  for O(N k (n − k) + k²(n − k)) flops; the REFUTE_CANDIDATES most negative Δ are re-scored exactly. The
  pass is skipped (logged at DEBUG) when that estimate exceeds SWAP_PASS_MAX_FLOPS: blocks beyond every
  built-in exact solver's max_size (512), e.g. n = 4000, k = 2000 with N = 1000 rows.

REFUTE_RTOL (1e-4) sits above the optimality tolerances of the built-in exact solvers (bnb 1e-9, highs
1e-7, SCIP through pyomo / cvxpy ~1e-5): a support within it of the claim is not a refutation.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import numpy as np

from formulations import objective as obj
from formulations.patterns import pattern_violation
from formulations.problem import BlockProblem

from .certificate import tighten_bound
from .errors import CBSError, InvalidOptionError, SolverError, describe_value, one_line
from .options import SolveOptions
from .progress import get_logger
from .result import SolveResult, Status, Termination
from .solvers.base import SubsetSolver, spd_inverse
from .solvers.registry import get_solver

__all__ = [
    "solve_block", "check_result", "call_solver", "note_overshoot", "time_limit_grace", "overshoot_warned",
    "forget_overshoot_warnings",
    "UnprovenOptimalityWarning", "TimeLimitExceededWarning", "SolverCallError", "SolverAnswerError",
]

log = get_logger(__name__)

#: relative tolerance for "the solver's objective agrees with the re-score" and "bound ≤ objective"
RTOL = 1e-6
#: a claim (optimal objective or bound) is refuted by a support better than it by more than this, relatively
REFUTE_RTOL = 1e-4
#: blocks with at most this many supports C(n, k) are searched whole when a claim is checked
BRUTE_FORCE_MAX = 2000
#: the single-swap pass is skipped above this estimate of its cost (flops; ~0.1-0.3 s here)
SWAP_PASS_MAX_FLOPS = 1e9
#: the best single swaps re-scored exactly
REFUTE_CANDIDATES = 3
#: the time-limit grace: max(GRACE_SECONDS, GRACE_FRACTION · limit)
GRACE_SECONDS = 1.0
GRACE_FRACTION = 0.1

#: solver names already warned about a time-limit overrun in this process (see note_overshoot)
_OVERSHOOT_WARNED: set[str] = set()


class UnprovenOptimalityWarning(UserWarning):
    """An exact solver stopped (time or iteration limit) before proving optimality."""


class TimeLimitExceededWarning(UserWarning):
    """A solver ran past its time limit by more than the grace (once per solver per process)."""


class SolverCallError(SolverError):
    """A solver raised, or returned something that is not a SolveResult."""


class SolverAnswerError(SolverError):
    """A solver's claim (optimal objective, or its bound) is refuted by a better support the engine found."""


def time_limit_grace(limit: float) -> float:
    """Seconds a solve may run past ``limit`` before it counts as ignoring it: max(1 s, 10 % of the limit)."""
    return max(GRACE_SECONDS, GRACE_FRACTION * float(limit))


def overshoot_warned(name: str) -> bool:
    """True when :func:`note_overshoot` already warned about solver ``name`` in this process."""
    return name in _OVERSHOOT_WARNED


def forget_overshoot_warnings(name: str | None = None) -> None:
    """Let :func:`note_overshoot` warn again about ``name`` (None: about every solver)."""
    if name is None:
        _OVERSHOOT_WARNED.clear()
    else:
        _OVERSHOOT_WARNED.discard(name)


def _name(solver: Any) -> str:
    return str(getattr(solver, "name", type(solver).__name__))


def _block(problem: BlockProblem) -> str:
    return f"block '{problem.label}'" if problem.label else "the block"


def call_solver(solver: SubsetSolver, problem: BlockProblem, options: SolveOptions,
                warm_start: np.ndarray | None = None) -> SolveResult:
    """``solver.solve(problem, options[, warm_start])``, checked: a raise or a non-SolveResult return is a
    :class:`SolverCallError` (module docstring); the result gets ``wall_time`` (when the solver left it 0),
    ``time_limit`` and ``overshoot`` by the engine's clock."""
    name = _name(solver)
    if problem.pattern is not None and not getattr(getattr(solver, "capabilities", None), "patterns", False):
        N, M = problem.pattern
        from .solvers.registry import pattern_solvers

        raise InvalidOptionError(f"Solver '{name}' does not honour N:M patterns, and {_block(problem)} has pattern "
                                 f"{N}:{M}. Solvers that do: {', '.join(pattern_solvers())}.")
    start = time.perf_counter()
    try:
        if warm_start is None:
            result = solver.solve(problem, options)
        else:
            result = solver.solve(problem, options, warm_start=warm_start)
    except CBSError:
        raise  # already one of ours, one line
    except Exception as exc:  # noqa: BLE001 - a plug-in's failure becomes one line naming it
        raise SolverCallError(f"Solver '{name}' failed on {_block(problem)}: {one_line(exc)}") from exc
    elapsed = time.perf_counter() - start
    if not isinstance(result, SolveResult):
        raise SolverCallError(f"Solver '{name}' returned {describe_value(result)} on {_block(problem)}, not a SolveResult.")
    if not result.wall_time:
        result.wall_time = elapsed
    limit = options.time_limit
    result.time_limit = None if limit is None else float(limit)
    result.overshoot = None if limit is None else max(0.0, elapsed - float(limit))
    return result


def note_overshoot(solver: Any, problem: BlockProblem, result: SolveResult) -> bool:
    """Warn (:class:`TimeLimitExceededWarning`, once per solver name per process) when ``result`` ran past
    its time limit by more than :func:`time_limit_grace`; True when it did."""
    if result.overshoot is None or result.time_limit is None:
        return False
    grace = time_limit_grace(result.time_limit)
    if result.overshoot <= grace:
        return False
    name = _name(solver)
    message = (f"Solver '{name}' ran {result.time_limit + result.overshoot:.3g} s on {_block(problem)} against a "
               f"time limit of {result.time_limit:g} s (grace {grace:g} s): it does not honour time limits")
    if name in _OVERSHOOT_WARNED:
        log.info("%s", message)
    else:
        _OVERSHOOT_WARNED.add(name)
        warnings.warn(message + "; later overruns of this solver are logged, not warned.", TimeLimitExceededWarning,
                      stacklevel=3)
    return True


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
    certify_time: float | None = None,
) -> SolveResult:
    """Check and complete a solver's answer in place; returns it.

    - |support| = k and, for an N:M block, N kept in every group of M, else SolverError;
    - re-score E(S) (``objective`` if the caller already computed it with the same math); a solver that
      reported a finite objective disagreeing beyond ``RTOL`` is a SolverError (catches scaling bugs);
    - ``bound`` ≤ objective (within tolerance), else SolverError;
    - ``Status.OPTIMAL`` only from exact solvers;
    - an ``optimal`` claim or a bound refuted by a better support is a :class:`SolverAnswerError`
      (module docstring: what is searched, and what is skipped);
    - with ``certify``: bound = max(solver bound, dual bound at the support's residual, and, for an answer
      not already certified by an exact solver's own bound, the tightened certificate of
      :mod:`engine.certificate` within ``certify_time``); gap filled.

    ``memo``: the block's :class:`~formulations.objective.UpdateMemo`; a re-score finds there the solve
    the solver already made of its final support.
    """
    name = _name(solver)
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
    if problem.pattern is not None:
        broken = pattern_violation(support, problem.pattern)
        if broken:
            N, M = problem.pattern
            raise SolverError(f"Solver '{name}' returned a support that breaks the {N}:{M} pattern of "
                              f"{_block(problem)}: {broken}.")
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
    claim = None
    if result.bound is not None and math.isfinite(result.bound):
        claim = min(float(result.bound), float(objective))
    elif result.status == Status.OPTIMAL:
        claim = float(objective)
    lb = None
    if certify or claim is not None:
        lb = obj.dual_bound(problem, alpha=residual) if residual is not None else obj.dual_bound(problem, support=support)
    if claim is not None and claim > lb + _refute_tol(problem, claim, claim):
        optimal = result.status == Status.OPTIMAL and claim >= objective - RTOL * max(1.0, abs(objective))
        what = f"claimed the optimal objective {claim:.10g}" if optimal else f"returned the bound {claim:.10g}"
        _refute(problem, support, claim, name, what)
    if certify:
        result.bound = lb if result.bound is None or not math.isfinite(result.bound) else max(result.bound, lb)
        own_bound = solver.capabilities.exact and claim is not None
        if not own_bound and "certificate_from" not in result.extra and result.status != Status.OPTIMAL:
            cert = tighten_bound(problem, support, objective, residual, result.weights, certify_time,
                                 result.wall_time)
            result.bound = max(result.bound, cert.bound)
            result.extra.update({"certificate_from": cert.source, "certificate_seconds": cert.seconds,
                                 "residual_bound": cert.residual_bound})
            if cert.better_objective is not None:
                result.extra["better_objective"] = cert.better_objective
        result.bound = min(result.bound, objective)  # rounding can put it a hair above
    result.gap = obj.relative_gap(result.objective, result.bound)
    if not result.solver:
        result.solver = name
    return result


# --------------------------------------------------------------------------------------------- refutation
def _scale(problem: BlockProblem) -> float:
    """E₀ = ½‖Xw‖² + ½λ‖w‖² + |gᵀw|: the size of the block's objective values."""
    y, w = problem.target(), problem.weights
    lin = 0.0 if problem.gradient is None else abs(float(problem.gradient @ w))
    return 0.5 * float(y @ y) + 0.5 * problem.damping * float(w @ w) + lin


def _refute_tol(problem: BlockProblem, claim: float, other: float) -> float:
    return REFUTE_RTOL * max(abs(claim), abs(other)) + 1e-12 * _scale(problem)


def _refute(problem: BlockProblem, support: np.ndarray, claim: float, name: str, what: str) -> None:
    """Raise :class:`SolverAnswerError` (``Solver 'NAME' WHAT on the block, but ...``) when a support beats
    ``claim`` (module docstring); else return."""
    n, k = problem.n, problem.n_keep
    m = min(k, n - k)
    if m == 0:
        return
    if m >= 2 and math.comb(n, k) <= BRUTE_FORCE_MAX:
        kind = f"C({n}, {k})" if problem.pattern is None else "{}:{}".format(*problem.pattern)
        candidates, how = _brute_force_candidates(problem, support, claim), f"all {kind} supports"
    else:
        X = problem.factor_matrix()
        cost = float(k) * (n - k) * (X.shape[0] + k) + float(X.shape[0]) * k * k
        if cost > SWAP_PASS_MAX_FLOPS:
            log.debug("claim of solver '%s' on %s not checked: a swap pass would cost %.3g flops", name,
                      _block(problem), cost)
            return
        candidates, how = _swap_candidates(problem, support), "a single swap"
    best_value, best = math.inf, None
    with warnings.catch_warnings():  # an ill-conditioned candidate's SVD fallback is no news to the user
        warnings.simplefilter("ignore", obj.IllConditionedWarning)
        for T in candidates:
            value = obj.optimal_update(problem, T).objective
            if value < best_value:
                best_value, best = value, T
    if best is None or not best_value < claim - _refute_tol(problem, claim, best_value):
        return
    kept = np.flatnonzero(best).tolist()
    shown = ", ".join(map(str, kept[:20])) + (", ..." if len(kept) > 20 else "")
    if how == "a single swap":
        out_, in_ = np.flatnonzero(support & ~best).tolist(), np.flatnonzero(best & ~support).tolist()
        how = f"a single swap: drop {out_[0]}, keep {in_[0]}"
    raise SolverAnswerError(
        f"Solver '{name}' {what} on {_block(problem)}, but the support [{shown}] ({how}) has E = {best_value:.10g} "
        f"< {claim:.10g}: its answer is refuted."
    )


def _brute_force_candidates(problem: BlockProblem, support: np.ndarray, claim: float) -> list[np.ndarray]:
    """The REFUTE_CANDIDATES best of all C(n, k) supports other than ``support`` by the batched dense evaluator,
    those it puts below ``claim`` (it only ranks: the caller re-scores them exactly)."""
    from .solvers.incumbent import DenseEvaluator  # numpy only; imported when a tiny block is checked
    from .solvers.brute_force import side_combinations

    n, k = problem.n, problem.n_keep
    # the kept sets, only those the block's N:M pattern allows when it has one
    kept_sets = list(side_combinations(n, k, problem.pattern, pruned_side=False))
    supports = np.zeros((len(kept_sets), n), dtype=bool)
    for row, kept in enumerate(kept_sets):
        supports[row, list(kept)] = True
    values = DenseEvaluator(problem).values(supports)
    order = np.argsort(values, kind="stable")[: REFUTE_CANDIDATES + 1]
    return [supports[i] for i in order if values[i] < claim and not np.array_equal(supports[i], support)][
        :REFUTE_CANDIDATES]


def _swap_candidates(problem: BlockProblem, support: np.ndarray) -> list[np.ndarray]:
    """The REFUTE_CANDIDATES single swaps of ``support`` with the most negative Δ(p, q) (module docstring),
    the pruned side taken in column chunks so that no (k × chunk) array exceeds ~2²¹ entries."""
    X = problem.factor_matrix()
    lam, w = problem.damping, problem.weights
    g = problem.gradient if problem.gradient is not None else np.zeros(problem.n)
    S, P = np.flatnonzero(support), np.flatnonzero(~support)
    y = problem.target()
    XS = np.asarray(X[:, S], dtype=np.float64)
    M = XS.T @ XS
    M[np.diag_indices_from(M)] += lam
    A = spd_inverse(M)
    v = A @ (XS.T @ y + lam * w[S] - g[S])
    r = XS @ v - y
    a_diag = np.diag(A)
    found: list[tuple[float, int, int]] = []  # (Δ, slot q, pruned p)
    chunk = max(1, 2**21 // max(S.size, 1))
    for c0 in range(0, P.size, chunk):
        idx = P[c0 : c0 + chunk]
        XP = np.asarray(X[:, idx], dtype=np.float64)
        u = XP.T @ r - lam * w[idx] + g[idx]
        B = XS.T @ XP
        T = A @ B
        s = np.maximum(np.einsum("ij,ij->j", XP, XP) + lam - np.einsum("ij,ij->j", B, T), lam)  # s ≥ λ exactly
        V1 = v[:, None] + T * (u / s)
        delta = -(u * u) / (2 * s) + V1 * V1 / (2 * (a_diag[:, None] + T * T / s))
        if problem.pattern is not None:  # a swap keeps an N:M pattern only inside one group of M
            group = problem.pattern[1]
            delta[S[:, None] // group != idx[None, :] // group] = np.inf
        flat = delta.ravel()
        top = np.argpartition(flat, min(REFUTE_CANDIDATES, flat.size) - 1)[:REFUTE_CANDIDATES]
        found += [(float(flat[i]), int(i // idx.size), int(idx[i % idx.size])) for i in top]
    found.sort()
    out = []
    for d, q, p in found[:REFUTE_CANDIDATES]:
        if not d < 0:  # inf included: a swap the pattern forbids
            break
        T_ = support.copy()
        T_[S[q]], T_[p] = False, True
        out.append(T_)
    return out


# ----------------------------------------------------------------------------------------------- solve
def solve_block(
    problem: BlockProblem,
    solver: str | SubsetSolver = "magnitude",
    options: SolveOptions | None = None,
    warm_start: np.ndarray | None = None,
    **params,
) -> SolveResult:
    """Solve one block and return a checked :class:`SolveResult` (objective re-scored, claims checked, gap
    certified, overshoot of the time limit recorded).

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
    result = call_solver(inst, problem, options, warm_start)
    note_overshoot(inst, problem, result)
    result = check_result(problem, result, inst, certify=options.certify, memo=options.memo,
                          certify_time=options.certify_time)
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
