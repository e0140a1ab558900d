"""Tightening the certificate of an answer: a lower bound on min_{|S|=k} E(S) that means something.

The free certificate of any support S is the dual bound at its own residual, LB(α_S) with α_S = X v*(S) − y
(``formulations.objective.dual_bound``). It is valid but weak where λ is small: every pruned weight i costs
c_i = (X_iᵀα − λw_i + g_i)²/(2λ), so on real blocks it is often far below zero (gaps of 10-30× E). LB(α) is
concave in α and its maximum is the perspective (Boolean) relaxation, so the bound can be tightened
without any search, and on small blocks a short branch and bound tightens it further. In order, each step
only when the budget is not spent and the gap is still open:

1. **Residual bound** LB(α_S): one pass over X (always; it is also what ``check_result`` refutes claims with).
2. **Trivial bound**: min_v q(v) = −½ gᵀH⁻¹g, i.e. 0 when g = 0 (every E(S) ≥ the unconstrained minimum),
   so a certified gap never exceeds 100 % when g = 0 (with g ≠ 0 it takes an n×n solve: blocks of at most
   ``DENSE_MAX`` weights, within the budget).
3. **Perspective relaxation**, warm-started at the answer's own update v*(S) (where LB starts at the
   residual bound of the split used):

   * n ≤ ``DENSE_MAX``: dense, with the split H = A + δI, δ = λ_min(H) (``formulations.cuts``; δ ≥ λ, often
     ≫ λ on real blocks, and computed once for the rows of a layer, which share H), by FISTA
     (``formulations.cuts.solve_perspective``);
   * larger blocks: matrix-free with δ = λ (``formulations.cuts.dual_ascent``: two products with X per
     iteration, no n×n matrix).

   Under an N:M pattern the bound at each dual point takes the N largest scores of every group
   (``formulations.patterns.group_top_sum``), which is valid for pattern supports and never weaker.
4. **Branch and bound** (n ≤ ``DENSE_MAX``, only with an explicit budget): ``bnb`` warm-started at S for
   the time left, with a relative tolerance of ``BNB_REL_GAP`` (it stops proving once every open node is
   within 0.5 % of its incumbent U): its bound is the lowest open node, or U − 0.5 %·|U| when it ends. So a
   finished search certifies every answer to within half a point of its true gap.

The result is max of all of them (never below the residual bound) and never above E(S).

**Budget** (``SolveOptions.certify_time`` / ``--certify-time``): ``None`` (default) spends about
``AUTO_FRACTION`` of the solve's own time on step 3: the relaxation runs when its fixed cost (the
eigenvalues of H, ``MIN_ITERS`` iterations; :func:`_relaxation_seconds`) fits in that share, and then until
the share is spent, so a whole-network run changes by a few percent and a millisecond heuristic keeps steps
1-2. A number of seconds T > 0 runs step 3 (at most ``RELAX_ITERS`` iterations) and then step 4 until
T is spent. ``0`` keeps the residual bound and, when g = 0, the trivial bound. The seconds spent and the
step that gave the bound are recorded in the result's ``extra`` (``certificate_seconds``,
``certificate_from``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from formulations import objective as obj
from formulations.cuts import dense_subproblem, dual_ascent, perspective_shift, solve_perspective
from formulations.problem import BlockProblem

__all__ = ["Certificate", "tighten_bound", "DENSE_MAX", "AUTO_FRACTION", "MIN_ITERS", "RELAX_ITERS", "BNB_REL_GAP"]

#: blocks up to this many weights get the dense relaxation (δ = λ_min(H)) and may get branch and bound
DENSE_MAX = 512
#: the default budget: this fraction of the solve's own time
AUTO_FRACTION = 0.05
#: relaxation iterations run under the default budget once it starts the relaxation
MIN_ITERS = 8
#: floating-point operations per second assumed when deciding whether the default budget affords the relaxation
FLOPS = 1e9
#: iteration cap of the relaxation with an explicit budget
RELAX_ITERS = 400
#: relative tolerance of the branch and bound that tightens a certificate (its bound is U − this·|U|)
BNB_REL_GAP = 0.005


@dataclass(frozen=True)
class Certificate:
    """bound : the tightened lower bound (≥ residual_bound, ≤ objective); source : "residual", "trivial",
    "relaxation" or "bnb" (the step that gave it); seconds : time spent beyond the residual bound;
    residual_bound : LB at the answer's residual; better_objective : E of a better support that branch and
    bound found on the way (None if none): the answer is then provably not optimal."""

    bound: float
    source: str
    seconds: float
    residual_bound: float
    better_objective: float | None = None


def _dense_shift(problem: BlockProblem) -> tuple[np.ndarray, float, float]:
    """(H, δ, λ_max(H − δI)), shared by the rows of a layer (they share H)."""
    H = problem.derived("certificate_hessian", lambda p: p.dense_hessian(), shared=True)
    delta, lip = problem.derived("certificate_shift", lambda p: perspective_shift(H, p.damping), shared=True)
    return H, delta, lip


def _trivial_bound(problem: BlockProblem, dense: bool, allowed: float | None) -> float | None:
    """min_v q(v) = −½ gᵀH⁻¹g (0 when g = 0); None when that needs an n×n solve we do not make (a large
    block, or one whose H and solve would not fit in ``allowed`` seconds; None: no limit)."""
    g = problem.gradient
    if g is None or not np.any(g):
        return 0.0
    if not dense:
        return None
    n, N = problem.n, problem.n_samples
    flops = n ** 3 / 3.0 + (0.0 if problem.has_derived("certificate_hessian", shared=True) else 2.0 * N * n * n)
    if allowed is not None and flops / FLOPS > allowed:
        return None
    H = problem.derived("certificate_hessian", lambda p: p.dense_hessian(), shared=True)
    try:
        sol = scipy.linalg.solve(H, g, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return None
    return -0.5 * float(g @ sol)


def tighten_bound(problem: BlockProblem, support: np.ndarray, objective: float, residual: np.ndarray | None,
                  v: np.ndarray | None, budget: float | None, solve_seconds: float = 0.0) -> Certificate:
    """The tightened certificate of the answer ``support`` (module docstring).

    support : (n,) bool; objective : its E(S); residual : X v*(S) − y (N,) or None (recomputed);
    v : its optimal update v*(S) (n,) or None (recomputed); budget : ``certify_time`` (None: automatic,
    0: the residual bound and, when g = 0, the trivial one; T > 0: seconds); solve_seconds : the solve's own
    time (sets the automatic budget).
    """
    start = time.perf_counter()
    if residual is None or v is None:
        sol = obj.optimal_update(problem, support)
        residual, v = sol.residual, sol.weights
    best = obj.dual_bound(problem, alpha=residual)
    residual_bound, source = best, "residual"
    n, k = problem.n, problem.n_keep
    dense = n <= DENSE_MAX

    def done() -> bool:
        return best >= objective - 1e-12 * max(1.0, abs(objective))

    allowed = AUTO_FRACTION * max(solve_seconds, 0.0) if budget is None else float(budget)
    trivial = _trivial_bound(problem, dense, allowed) if not done() else None
    if trivial is not None and trivial > best:
        best, source = trivial, "trivial"
    better = None
    if budget != 0 and 0 < k < n and not done():
        if budget is None:
            deadline, iters, min_iters = start + allowed, RELAX_ITERS, MIN_ITERS
            run_relaxation = _relaxation_seconds(problem, dense) <= allowed
        else:
            deadline, iters, min_iters = start + float(budget), RELAX_ITERS, 1
            run_relaxation = True
        relaxed = _relaxation(problem, v, iters, min_iters, deadline, dense) if run_relaxation else -math.inf
        if relaxed > best:
            best, source = relaxed, "relaxation"
        if budget is not None and dense and not done() and time.perf_counter() < deadline:
            bnb_bound, found = _branch_and_bound(problem, support, deadline - time.perf_counter())
            if found < objective - 1e-9 * max(1.0, abs(objective)):
                better = found
            if bnb_bound > best:
                best, source = bnb_bound, "bnb"
    best = min(best, float(objective))  # rounding can put it a hair above
    return Certificate(float(best), source, time.perf_counter() - start, float(residual_bound), better)


def _relaxation_seconds(problem: BlockProblem, dense: bool) -> float:
    """A cautious estimate (at ``FLOPS`` per second) of the relaxation's fixed cost under the default budget:
    the eigenvalues of H unless the rows of its layer already paid for them, and ``MIN_ITERS`` iterations
    (dense: two n×n products; matrix-free: the power iterations for λ_max(F) and four products with X each)."""
    n, N = problem.n, problem.n_samples
    if dense:
        flops = 2.0 * MIN_ITERS * n * n
        if not problem.has_derived("certificate_shift", shared=True):
            flops += 4.0 * n ** 3
        if not problem.has_derived("certificate_hessian", shared=True):
            flops += 2.0 * N * n * n
    else:
        flops = (60.0 + 4.0 * MIN_ITERS) * N * n
    return flops / FLOPS


def _relaxation(problem: BlockProblem, v: np.ndarray, iters: int, min_iters: int, deadline: float,
                dense: bool) -> float:
    """The best bound of the perspective relaxation from the start ``v`` (module docstring, step 3); the
    first ``min_iters`` iterations run whatever the deadline (a few n² or N·n products)."""
    if not dense:  # dual_bound inside dual_ascent takes the group bound under a pattern
        return dual_ascent(problem, iters=iters, deadline=deadline, v0=v, min_iter=min_iters).bound
    H, delta, lip = _dense_shift(problem)
    sub = dense_subproblem(problem, hessian=H)
    res = solve_perspective(sub, delta, lip, v0=v, max_iter=iters, rtol=1e-9, deadline=deadline,
                            min_iter=min_iters)
    # the relaxation keeps the k largest scores; under a pattern the group bound at its best dual point
    return res.base - obj.kept_score_sum(problem, res.scores) if math.isfinite(res.base) else -math.inf


def _branch_and_bound(problem: BlockProblem, support: np.ndarray, seconds: float) -> tuple[float, float]:
    """(a lower bound from ``bnb`` within ``seconds``, the E of the best support it found).

    The search runs with the relative tolerance ``BNB_REL_GAP``: it prunes every node whose bound is within
    that fraction of its incumbent U, which makes it end far sooner than a proof to 1e-9. When it ends, every
    node was pruned at a bound ≥ U' − tol' for the incumbent U' ≥ U of its time, so U − ``BNB_REL_GAP``·|U|
    is the certified bound (never U itself); cut by the time, its bound is the lowest open node's."""
    from .options import SolveOptions
    from .result import Status
    from .solvers.branch_and_bound import BranchAndBoundSolver

    res = BranchAndBoundSolver(rel_gap=BNB_REL_GAP).solve(
        problem, SolveOptions(time_limit=max(seconds, 1e-3), certify=False), warm_start=support)
    found = obj.optimal_update(problem, res.support).objective
    if res.status == Status.OPTIMAL:
        return found - max(BNB_REL_GAP * abs(found), 1e-12), found
    bound = res.bound if res.bound is not None and math.isfinite(res.bound) else -math.inf
    return float(min(bound, found)), found
