"""HiGHS (highspy) backends: the exact cutting-plane solver "highs", the QP relaxation, and budget allocation.

**Exact: outer approximation in z with a MILP master** (DESIGN §1, ``formulations.cuts``). For binary z,
f(z) = E(S(z)) ≥ D(d, z) = base(d) − c(d)ᵀz for every step d, with equality at the optimal step of z;
so min f = min { η : η ≥ base_j − c_jᵀz ∀ cuts j, Σz = k, z binary } once the cuts include one tight at
the optimum. HiGHS cannot solve MIQPs, but this master is a MILP (``formulations.canonical.cut_master_model``).
What makes it converge in few rounds instead of Kelley's hundreds (DESIGN §1b):

* the split H = A + δI with δ ≈ λ_min(H) (not λ): every cut is a stronger under-estimator;
* the root relaxation's dual point (``formulations.cuts.solve_perspective``) gives the cut
  η ≥ base − cᵀz whose master optimum *is* the relaxation bound, so the first master's bound is strong;
* a strong incumbent (``branch_and_bound.heuristic_incumbent``: heuristics + swap local search) and cuts at
  it and at all its single-swap neighbours, then each round cuts at every master solution HiGHS reports
  (final and improving, via ``kCallbackMipImprovingSolution``) and at the neighbours of new incumbents;
* the master is warm-started with the incumbent (``setSolution``), and η is scaled by |incumbent| so HiGHS's
  absolute tolerances mean relative ones.

A master's dual bound is a valid lower bound on min f (the cuts under-estimate f), so the solver stops
with OPTIMAL when it reaches the incumbent (gap ≤ ``rel_gap``), and at the time limit returns the
incumbent with the best master bound.

**Time limit.** The clock is read between phases (incumbent, root relaxation, master build), between
support cuts (the k(n − k) neighbour cuts of an incumbent take seconds at n = 200: the ones not computed by
the deadline are left out, which keeps the master valid) and before each master solve, which gets the time
left as HiGHS's own ``time_limit``. Past the deadline the incumbent is returned with the bound so far
(TIME_LIMIT).

**HiGHS callbacks (highspy 1.15.1, measured).** ``kCallbackMipImprovingSolution`` works (each improving
master solution arrives in ``data_out.mip_solution``: used here); ``kCallbackMipInterrupt`` /
``kCallbackMipUserSolution`` exist (interrupt, inject solutions). ``kCallbackMipDefineLazyConstraints``
is accepted by ``startCallback`` but never invoked, and ``HighsCallbackInput`` has no field through which
constraints could be returned (only user_interrupt / user_solution / setSolution / repairSolution): so
no lazy constraints, and the master is re-solved each round (incremental ``addRows`` on the same Highs
object keeps HiGHS's setup; the MIP search itself restarts).

**QP relaxation** (:func:`qp_relaxation_bound`): the big-M continuous relaxation through HiGHS's QP solver;
its value is −½gᵀH⁻¹g (0 when g = 0) whenever big-M is loose: worthless, as documented in
``formulations.canonical``.

**Budget allocation** (:func:`solve_budget_allocation`): the multiple-choice knapsack over blocks' loss
curves, one binary per (block, grid point).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from formulations.canonical import QuadraticModel, cut_master_arrays, qp_relaxation_model
from formulations.cuts import (
    dense_subproblem,
    perspective_shift,
    solve_perspective,
    support_cut,
)
from formulations.errors import InvalidProblemError
from formulations.objective import optimal_update, relative_gap
from formulations.problem import BlockProblem

from ..errors import SolverError, SolverUnavailableError, invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver
from .incumbent import DenseEvaluator, heuristic_incumbent

__all__ = ["HighsSolver", "qp_relaxation_bound", "solve_budget_allocation", "highs_from_model"]


def _highspy():
    try:
        import highspy  # noqa: PLC0415 - optional at import time of the package
    except ImportError as exc:  # pragma: no cover - highspy is a core dependency
        raise SolverUnavailableError(
            "The HiGHS backends need highspy, which is not installed. Install it with: pip install highspy"
        ) from exc
    return highspy


_BANNER_SHOWN = False


def silent_highs():
    """A ``highspy.Highs`` that prints nothing. The first one of a process writes HiGHS's copyright banner
    to the C-level stdout before ``silent()`` can stop it (it broke ``cbs solve --json``), so that one is
    created with file descriptor 1 pointed at /dev/null."""
    global _BANNER_SHOWN
    hp = _highspy()
    if _BANNER_SHOWN:
        h = hp.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = hp.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _BANNER_SHOWN = True
    h.silent()
    return h


def highs_from_model(model: QuadraticModel, time_limit: float | None = None):
    """A silent ``highspy.Highs`` holding a :class:`QuadraticModel` (LP, QP, or MILP; HiGHS refuses MIQP).

    Rows are passed row-wise (CSR), the Hessian as HiGHS's lower-triangular column-wise ``kTriangular``.
    """
    hp = _highspy()
    h = silent_highs()
    lp = hp.HighsLp()
    lp.num_col_ = model.n_vars
    lp.num_row_ = model.n_rows
    lp.col_cost_ = np.asarray(model.q, dtype=np.float64)
    lp.offset_ = float(model.constant)
    inf = hp.kHighsInf
    lp.col_lower_ = np.where(np.isfinite(model.lb), model.lb, -inf)
    lp.col_upper_ = np.where(np.isfinite(model.ub), model.ub, inf)
    lp.row_lower_ = np.where(np.isfinite(model.row_lower), model.row_lower, -inf)
    lp.row_upper_ = np.where(np.isfinite(model.row_upper), model.row_upper, inf)
    A = model.A.tocsr()
    lp.a_matrix_.format_ = hp.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data.astype(np.float64)
    lp.a_matrix_.num_col_ = model.n_vars
    lp.a_matrix_.num_row_ = model.n_rows
    if model.integrality.any():
        lp.integrality_ = [hp.HighsVarType.kInteger if t else hp.HighsVarType.kContinuous for t in model.integrality]
    hm = hp.HighsModel()
    hm.lp_ = lp
    if model.P.nnz:
        P = model.P.tocsc()
        P.sort_indices()
        hess = hp.HighsHessian()
        hess.dim_ = model.n_vars
        hess.format_ = hp.HessianFormat.kTriangular
        hess.start_ = P.indptr.astype(np.int32)
        hess.index_ = P.indices.astype(np.int32)
        hess.value_ = P.data.astype(np.float64)
        hm.hessian_ = hess
    status = h.passModel(hm)
    if status == hp.HighsStatus.kError:
        raise SolverError(f"HiGHS rejected the model '{model.name}'.")
    if time_limit is not None:
        h.setOptionValue("time_limit", float(max(time_limit, 1e-3)))
    return h


def qp_relaxation_bound(
    problem: BlockProblem,
    upper_bound: float | None = None,
    low_rank: bool | None = None,
    time_limit: float | None = None,
) -> float:
    """The big-M continuous QP relaxation's optimum (a valid but weak lower bound), solved by HiGHS.

    Returns the optimal value, or −inf when HiGHS does not report an optimum (time limit, failure).
    """
    hp = _highspy()
    model = qp_relaxation_model(problem, upper_bound, low_rank)
    h = highs_from_model(model, time_limit)
    h.run()
    if h.getModelStatus() != hp.HighsModelStatus.kOptimal:
        return -math.inf
    return float(h.getInfo().objective_function_value)


# --------------------------------------------------------------------------------------- exact solver
class HighsSolver(SubsetSolver):
    """Exact cutting planes in z with a HiGHS MILP master (module docstring).

    Parameters
    ----------
    rel_gap : stop with OPTIMAL when (incumbent − master bound)/|incumbent| ≤ rel_gap (default 1e-7;
        HiGHS's own tolerances are ~1e-9 on the scaled η).
    max_rounds : master solves before ITERATION_LIMIT (default 500).
    neighbour_cuts : cut at every single swap of each new incumbent (default True).
    neighbour_solutions : also cut at the single swaps of this many of the best master solutions per
        round (default 2).
    threads : HiGHS threads (default 1: the CPU is usually shared).
    """

    name = "highs"
    capabilities = Capabilities(
        exact=True,
        reports_bound=True,
        max_size=512,
        warm_start=True,
        requires=("highspy",),
        description="Exact outer approximation in z (perspective cuts) with a HiGHS MILP master.",
    )

    def __init__(
        self,
        rel_gap: float = 1e-7,
        max_rounds: int = 500,
        neighbour_cuts: bool = True,
        neighbour_solutions: int = 2,
        threads: int = 1,
    ) -> None:
        if isinstance(rel_gap, bool) or not isinstance(rel_gap, (int, float)) or not 0 <= rel_gap < 1:
            raise invalid_option("rel_gap", "HighsSolver()", "a number in [0, 1)", repr(rel_gap))
        for nm, val, lo in (("max_rounds", max_rounds, 1), ("threads", threads, 1), ("neighbour_solutions", neighbour_solutions, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise invalid_option(nm, "HighsSolver()", f"an integer >= {lo}", repr(val))
        self.neighbour_solutions = neighbour_solutions
        self.rel_gap = float(rel_gap)
        self.max_rounds = max_rounds
        self.neighbour_cuts = bool(neighbour_cuts)
        self.threads = threads

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Cutting-plane rounds until the master's bound meets the incumbent (or a limit)."""
        self.ensure_available()
        hp = _highspy()
        from highspy import cb  # noqa: PLC0415

        start = time.perf_counter()
        deadline = None if options.time_limit is None else start + options.time_limit
        n, k = problem.n, problem.n_keep
        evaluator = DenseEvaluator(problem)
        best_S, best_val, info = heuristic_incumbent(problem, evaluator, warm_start, deadline)

        def done(bound: float | None, status: Status, term: Termination, rounds: int) -> SolveResult:
            bound = None if bound is None else min(bound, best_val)
            return SolveResult(
                support=best_S.copy(), objective=best_val, bound=bound, gap=relative_gap(best_val, bound),
                status=status, termination=term, wall_time=time.perf_counter() - start, iterations=rounds,
                solver=self.name, extra=info,
            )

        if k == 0 or k == n:
            return done(best_val, Status.OPTIMAL, Termination.OPTIMAL, 0)

        def late() -> bool:
            return deadline is not None and time.perf_counter() > deadline

        if late():  # the incumbent's search used the time: no bound of ours (the engine certifies one)
            return done(None, Status.FEASIBLE, Termination.TIME_LIMIT, 0)
        # the root relaxation: its dual point's cut makes the first master bound the relaxation bound
        root = dense_subproblem(problem)
        delta, lip = perspective_shift(root.hessian, problem.damping)
        v0 = optimal_update(problem, best_S, options.memo).weights
        rel = solve_perspective(root, delta, lip, v0=v0, max_iter=3000, rtol=1e-10)
        bound = rel.bound
        info.update({"root_bound": rel.bound, "shift": delta, "relaxation_iterations": rel.iterations})
        tol = max(self.rel_gap * abs(best_val), 1e-14)
        if bound >= best_val - tol:
            return done(bound, Status.OPTIMAL, Termination.OPTIMAL, 0)
        if late():
            return done(bound, Status.FEASIBLE, Termination.TIME_LIMIT, 0)

        scale = max(abs(best_val), abs(bound), 1e-300)
        cuts_C: list[np.ndarray] = [rel.scores / scale]
        cuts_rhs: list[float] = [rel.base / scale]
        cut_keys: set[bytes] = set()

        def add_support_cuts(supports: list[np.ndarray]) -> None:
            for i, s in enumerate(supports):
                if i % 16 == 15 and late():
                    return  # the cuts left out only weaken the master, never invalidate it
                key = np.packbits(s).tobytes()
                if key in cut_keys:
                    continue
                cut_keys.add(key)
                c = support_cut(problem, s, shift=delta)
                cuts_C.append(c.coefficients / scale)
                cuts_rhs.append(c.rhs / scale)

        def neighbours(S: np.ndarray) -> list[np.ndarray]:
            out = []
            for i in np.flatnonzero(S):
                for j in np.flatnonzero(~S):
                    T = S.copy()
                    T[i], T[j] = False, True
                    out.append(T)
            return out

        add_support_cuts([best_S] + (neighbours(best_S) if self.neighbour_cuts else []))

        # the master: formulations.canonical.cut_master_arrays (z binary, then η scaled, η ≥ the root bound)
        master = cut_master_arrays(n, k, np.vstack(cuts_C), np.asarray(cuts_rhs), eta_lower=bound / scale)
        h = highs_from_model(master)
        h.setOptionValue("threads", int(self.threads))
        h.setOptionValue("mip_rel_gap", 0.1 * self.rel_gap)
        h.setOptionValue("mip_abs_gap", 1e-12)
        h.setOptionValue("mip_feasibility_tolerance", 1e-9)
        inf = hp.kHighsInf
        n_rows_added = len(cuts_rhs)

        def flush_cuts() -> None:
            nonlocal n_rows_added
            new = len(cuts_rhs) - n_rows_added
            if new <= 0:
                return
            C = np.vstack(cuts_C[n_rows_added:])
            rhs = np.asarray(cuts_rhs[n_rows_added:])
            idx = np.tile(np.arange(n + 1, dtype=np.int32), new)
            vals = np.hstack([C, np.ones((new, 1))]).ravel()
            starts = np.arange(new, dtype=np.int32) * (n + 1)
            h.addRows(new, rhs, np.full(new, inf), vals.size, starts, idx, vals)
            n_rows_added = len(cuts_rhs)

        found: list[np.ndarray] = []

        def on_solution(callback_type, message, data_out, data_in, user_data):  # noqa: ARG001
            sol = np.asarray(data_out.mip_solution)
            if sol.size >= n:
                found.append(np.round(sol[:n]) > 0.5)

        h.setCallback(on_solution, None)
        h.startCallback(cb.HighsCallbackType.kCallbackMipImprovingSolution)

        rounds = 0
        term = Termination.ITERATION_LIMIT
        while rounds < self.max_rounds:
            if deadline is not None and time.perf_counter() > deadline:
                term = Termination.TIME_LIMIT
                break
            flush_cuts()
            rounds += 1
            if deadline is not None:
                h.setOptionValue("time_limit", max(deadline - time.perf_counter(), 1e-3))
            C_all = np.vstack(cuts_C)
            eta = max(float(np.max(np.asarray(cuts_rhs) - C_all @ best_S)), bound / scale)
            h.setSolution(_solution(hp, np.append(best_S.astype(float), eta)))
            found.clear()
            h.run()
            status = h.getModelStatus()
            mip_bound = float(h.getInfo().mip_dual_bound)
            if math.isfinite(mip_bound):
                bound = max(bound, mip_bound * scale)
            candidates = list(found)
            if status in (hp.HighsModelStatus.kOptimal, hp.HighsModelStatus.kTimeLimit,
                          hp.HighsModelStatus.kInterrupt, hp.HighsModelStatus.kSolutionLimit):
                col = np.asarray(h.getSolution().col_value)
                if col.size > n:
                    candidates.append(np.round(col[:n]) > 0.5)
            candidates = [c for c in candidates if int(c.sum()) == k]
            improved = False
            if candidates:
                vals = evaluator.values(np.stack(candidates))
                b = int(np.argmin(vals))
                if vals[b] < best_val:
                    best_S, best_val = candidates[b].copy(), float(vals[b])
                    improved = True
            tol = max(self.rel_gap * abs(best_val), 1e-14)
            if bound >= best_val - tol:
                term = Termination.OPTIMAL
                break
            if status == hp.HighsModelStatus.kTimeLimit:
                term = Termination.TIME_LIMIT
                break
            if status not in (hp.HighsModelStatus.kOptimal,):
                if not candidates:
                    raise SolverError(f"The HiGHS master failed with status {h.modelStatusToString(status)}.")
            before = len(cut_keys)
            add_support_cuts(candidates)
            if self.neighbour_cuts:
                # the swap neighbourhoods of the best few master solutions (and of a new incumbent)
                order = np.argsort(vals, kind="stable")[: self.neighbour_solutions] if candidates else []
                for b in order:
                    add_support_cuts(neighbours(candidates[int(b)]))
                if improved:
                    add_support_cuts(neighbours(best_S))
            if len(cut_keys) == before:
                # every master solution already has its tight cut: the master optimum is f there
                bound = max(bound, best_val) if status == hp.HighsModelStatus.kOptimal else bound
                term = Termination.OPTIMAL if bound >= best_val - tol else term
                break
        info.update({"rounds": rounds, "cuts": len(cuts_rhs), "master_bound": bound})
        optimal = term == Termination.OPTIMAL
        return done(bound, Status.OPTIMAL if optimal else Status.FEASIBLE, term, rounds)


def _solution(hp, values: np.ndarray):
    sol = hp.HighsSolution()
    sol.col_value = list(map(float, values))
    sol.value_valid = True
    return sol


# --------------------------------------------------------------------------------- budget allocation
def solve_budget_allocation(
    curves: Sequence[tuple[Sequence[int], Sequence[float]]], total_k: int, time_limit: float | None = None,
    at_most: bool = False,
) -> list[int]:
    """Choose one grid point per block so that Σ_b k_b = total_k and Σ_b E_b(k_b) is least (HiGHS MILP).

    With ``at_most`` the budget row is Σ_b k_b ≤ total_k instead (always feasible when the smallest grid
    points fit), for callers that hand out the remainder themselves.

    curves : one (ks, Es) per block: the grid of budgets (non-negative integers) and the block's loss E_b(k)
        there (finite floats), same length ≥ 1. Variables x_{b,j} ∈ {0,1}: Σ_j x_{b,j} = 1 per block,
        Σ_{b,j} k_{b,j} x_{b,j} = total_k; minimise Σ E_{b,j} x_{b,j}. Returns [k_b] in block order.
    Raises InvalidProblemError on malformed curves or when no choice sums to total_k.
    """
    hp = _highspy()
    if isinstance(total_k, bool) or not isinstance(total_k, (int, np.integer)) or total_k < 0:
        raise InvalidProblemError(
            f"The 'total_k' argument of solve_budget_allocation() must be an integer >= 0. Got {total_k!r}."
        )
    ks_all, es_all, block_of = [], [], []
    for b, curve in enumerate(curves):
        try:
            ks, es = curve
        except (TypeError, ValueError):
            raise InvalidProblemError(
                f"The 'curves' argument of solve_budget_allocation() must hold (ks, Es) pairs. Got {curve!r} at block {b}."
            ) from None
        ks = np.asarray(ks)
        es = np.asarray(es, dtype=np.float64)
        if ks.ndim != 1 or ks.size == 0 or ks.shape != es.shape:
            raise InvalidProblemError(
                "The 'curves' argument of solve_budget_allocation() must give equal-length, non-empty 1-D ks and Es. "
                f"Got shapes {ks.shape} and {es.shape} at block {b}."
            )
        if not np.issubdtype(ks.dtype, np.integer) or (ks < 0).any():
            raise InvalidProblemError(
                f"The 'curves' argument of solve_budget_allocation() must give integer ks >= 0. Got {ks.tolist()} at block {b}."
            )
        if not np.all(np.isfinite(es)):
            raise InvalidProblemError(
                f"The 'curves' argument of solve_budget_allocation() must give finite Es. Got NaN or inf at block {b}."
            )
        ks_all.append(ks.astype(np.float64))
        es_all.append(es)
        block_of.append(np.full(ks.size, b))
    B = len(ks_all)
    if B == 0:
        if total_k == 0:
            return []
        raise InvalidProblemError(f"solve_budget_allocation() got no blocks but total_k = {total_k}.")
    kv, ev, bv = np.concatenate(ks_all), np.concatenate(es_all), np.concatenate(block_of)
    nv = kv.size
    # scale the objective so HiGHS's absolute tolerances are relative
    scale = max(float(np.abs(ev).max()), 1e-300)
    h = silent_highs()
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("mip_abs_gap", 1e-12)
    h.setOptionValue("threads", 1)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    empty_i, empty_v = np.zeros(0, dtype=np.int32), np.zeros(0)
    h.addCols(nv, ev / scale, np.zeros(nv), np.ones(nv), 0, empty_i, empty_i, empty_v)
    h.changeColsIntegrality(nv, np.arange(nv, dtype=np.int32), np.array([hp.HighsVarType.kInteger] * nv))
    for b in range(B):
        idx = np.flatnonzero(bv == b).astype(np.int32)
        h.addRow(1.0, 1.0, idx.size, idx, np.ones(idx.size))
    h.addRow(-hp.kHighsInf if at_most else float(total_k), float(total_k), nv, np.arange(nv, dtype=np.int32), kv)
    h.run()
    status = h.getModelStatus()
    if status == hp.HighsModelStatus.kInfeasible:
        raise InvalidProblemError(
            f"No choice of one grid point per block sums to total_k = {total_k} in solve_budget_allocation(): "
            f"the grids allow totals in [{int(sum(k.min() for k in ks_all))}, {int(sum(k.max() for k in ks_all))}] "
            "but not this one. Add grid points."
        )
    if status != hp.HighsModelStatus.kOptimal:
        raise SolverError(f"HiGHS did not solve the budget allocation: {h.modelStatusToString(status)}.")
    x = np.asarray(h.getSolution().col_value) > 0.5
    return [int(kv[(bv == b) & x][0]) for b in range(B)]
