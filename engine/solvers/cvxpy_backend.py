"""The MIQP through cvxpy ("cvxpy"): SCIP (default) or Gurobi; or a perspective-relaxation bound (conic).

**Exact mode.** ``formulations.canonical.miqp_model`` (big-M from the incumbent's value) is written as a
cvxpy problem (:func:`cvxpy_problem`): one cvxpy variable per group (v, z Boolean, r), objective
½ xᵀPx + qᵀx + c (diagonal P → a weighted sum of squares; dense P → ½‖Fx‖² with P = FᵀF), rows as
equalities / inequalities. cvxpy hands SCIP a conic (SOC) model and Gurobi a QP.

**Measured here** (cvxpy 1.9.3, pyscipopt 6.3.0 = SCIP 10.0.2): HIGHS, SCIPY, CLARABEL, OSQP refuse
mixed-integer quadratic problems; SCIP proves them. A SCIP time limit comes back as
``optimal_inaccurate`` (cvxpy maps SCIP's "timelimit"/"gaplimit"/"nodelimit" to it): mapped here to
FEASIBLE + TIME_LIMIT (or ITERATION_LIMIT), never OPTIMAL. SCIP's ``limits/time`` is the time left
(cvxpy's compilation before it takes 0.04-0.26 s at n = 60-200, measured: left to the grace); a solve that
would get less than ``_MIN_SOLVE_SECONDS`` is not started (the incumbent, TIME_LIMIT). An earlier floor
of 1 s on SCIP's limit made every limit under 1 s overrun (0.6-0.8 s past 0.5 s at n = 60).
cvxpy's SCIP interface ignores warm starts, so "warm-started" means: big-M from the incumbent's value, and
the answer is never worse than the incumbent (we compare and fall back). SCIP's dual bound is read from the pyscipopt model cvxpy returns
(``solver_stats.extra_stats["model"]``) and shifted by cvxpy's constant offset (problem value minus SCIP's
objective at the same solution). The MIQP is built from ``scaled_problem(problem, 1/U)`` (incumbent value 1:
solver tolerances are absolute; see ``engine.solvers.pyomo_backend``) and the bound divided back. Gurobi (``solver="GUROBI"``) is used when gurobipy is installed.

**Relaxation mode** (``relaxation="perspective"``): ``formulations.canonical.perspective_relaxation``
(rotated cones v_i² ≤ s_i z_i written as SOC(s + z, [2v; s − z])) solved by CLARABEL (or SCS), with the
split δ = λ_min(H) (``shift="auto"``; or λ, the DESIGN's split). An interior-point optimum is not a
certificate, so the returned bound is recomputed exactly from the conic solution's v as the dual
bound LB(d), d = v − w (``formulations.cuts.lower_bound_at_step``): valid whatever the solver's accuracy.
The support returned is the heuristic incumbent (FEASIBLE, COMPLETED).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from formulations.canonical import QuadraticModel, miqp_model, perspective_relaxation, objective_scale, scaled_problem
from formulations.cuts import dense_subproblem, lower_bound_at_step, perspective_shift
from formulations.objective import relative_gap
from formulations.problem import BlockProblem

from ..errors import SolverUnavailableError, invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver
from .incumbent import DenseEvaluator, heuristic_incumbent

__all__ = ["CvxpySolver", "cvxpy_problem", "perspective_bound"]

#: solver → (modules, pip extra)
_MIP_SOLVERS = {"SCIP": (("cvxpy", "pyscipopt"), "cvxpy,scip"), "GUROBI": (("cvxpy", "gurobipy"), "cvxpy,gurobi")}
_CONIC_SOLVERS = ("CLARABEL", "SCS")
#: how far an "optimal" bound may sit below the re-scored support (solver tolerances ~1e-6)
_CLAIM_RTOL = 1e-5
#: a MIQP solve that would get less than this (seconds) is not started: the incumbent is returned (TIME_LIMIT)
_MIN_SOLVE_SECONDS = 0.05


def _cp():
    try:
        import cvxpy as cp  # noqa: PLC0415 - optional until used
    except ImportError as exc:  # cvxpy is optional: the ``cvxpy`` extra
        raise SolverUnavailableError(
            "cvxpy is not installed: pip install 'cbs-prune[cvxpy]' (needed by solver 'cvxpy')"
        ) from exc
    return cp


def _quadratic_term(cp, P_full, x):
    """½ xᵀ P x for symmetric PSD P: weighted squares when diagonal, else ½‖F x‖² with P = FᵀF (eigh)."""
    P = P_full.tocoo()
    if P.nnz == 0:
        return 0
    if np.all(P.row == P.col):
        d = np.zeros(P.shape[0])
        d[P.row] = P.data
        nz = np.flatnonzero(d)
        return 0.5 * cp.sum(cp.multiply(d[nz], cp.square(x[nz])))
    dense = P.toarray()
    evals, evecs = np.linalg.eigh(0.5 * (dense + dense.T))
    keep = evals > 1e-14 * max(float(evals.max()), 1e-300)
    F = np.sqrt(evals[keep])[:, None] * evecs[:, keep].T
    return 0.5 * cp.sum_squares(F @ x)


def cvxpy_problem(model: QuadraticModel) -> tuple[Any, dict[str, Any]]:
    """A cvxpy ``Problem`` of a :class:`QuadraticModel`; returns (problem, {group: cvxpy Variable}).

    Each group (``model.var_names``) must be all-integer (Boolean when bounds are [0, 1]) or all-continuous.
    """
    cp = _cp()
    groups: dict[str, Any] = {}
    parts = []
    for name, sl in sorted(model.var_names.items(), key=lambda kv: kv[1].start):
        size = sl.stop - sl.start
        ints = model.integrality[sl].astype(bool)
        if ints.any() and not ints.all():
            raise invalid_option("model", "cvxpy_problem()", "groups that are all-integer or all-continuous", name)
        if ints.all() and np.all(model.lb[sl] >= 0) and np.all(model.ub[sl] <= 1):
            var = cp.Variable(size, boolean=True, name=name)
        elif ints.all():
            var = cp.Variable(size, integer=True, name=name)
        else:
            var = cp.Variable(size, name=name)
        groups[name] = var
        parts.append(var)
    x = cp.hstack(parts) if len(parts) > 1 else parts[0]
    objective = _quadratic_term(cp, model.full_P(), x) + model.q @ x + model.constant
    cons = []
    A = model.A.tocsr()
    eq = model.row_lower == model.row_upper
    if eq.any():
        cons.append(A[eq] @ x == model.row_lower[eq])
    le = ~eq & np.isfinite(model.row_upper)
    if le.any():
        cons.append(A[le] @ x <= model.row_upper[le])
    ge = ~eq & np.isfinite(model.row_lower)
    if ge.any():
        cons.append(A[ge] @ x >= model.row_lower[ge])
    for bound, sense in ((model.lb, ">="), (model.ub, "<=")):
        fin = np.flatnonzero(np.isfinite(bound))
        # Boolean variables carry their own [0, 1]
        fin = fin[~(model.integrality[fin].astype(bool) & (model.lb[fin] >= 0) & (model.ub[fin] <= 1))]
        if fin.size:
            cons.append(x[fin] >= bound[fin] if sense == ">=" else x[fin] <= bound[fin])
    return cp.Problem(cp.Minimize(objective), cons), groups


def perspective_bound(
    problem: BlockProblem, shift: str | float = "auto", solver: str = "CLARABEL"
) -> tuple[float, float]:
    """(certified bound, conic optimum) of the perspective relaxation (module docstring).

    shift : "auto" (δ = λ_min(H)), "damping" (δ = λ), or a number in (0, λ_min(H)].
    The certified bound is LB(d) at the conic solution's step d = v − w; −inf if the solver fails.
    """
    cp = _cp()
    sub = dense_subproblem(problem)
    if shift == "auto":
        delta, _ = perspective_shift(sub.hessian, problem.damping)
    elif shift == "damping":
        delta = problem.damping
    else:
        delta = float(shift)
    pm = perspective_relaxation(problem, shift=delta)
    model = pm.model
    n = problem.n
    v = cp.Variable(n)
    s = cp.Variable(n)
    z = cp.Variable(n)
    x = cp.hstack([v, s, z])
    objective = _quadratic_term(cp, model.full_P(), x) + model.q @ x + model.constant
    cons = [cp.sum(z) == problem.n_keep, z >= 0, z <= 1, s >= 0, cp.SOC(s + z, cp.vstack([2 * v, s - z]), axis=0)]
    prob = cp.Problem(cp.Minimize(objective), cons)
    try:
        prob.solve(solver=solver, verbose=False)
    except Exception:  # noqa: BLE001 - a failed conic solve gives no bound, not an error
        return -math.inf, math.nan
    if v.value is None:
        return -math.inf, math.nan
    d = np.asarray(v.value, dtype=np.float64) - problem.weights
    return lower_bound_at_step(sub, delta, d), float(prob.value)


class CvxpySolver(SubsetSolver):
    """The MIQP through cvxpy, or a perspective bound (module docstring).

    Parameters
    ----------
    solver : "SCIP" (default) or "GUROBI" for the MIQP.
    relaxation : None (exact MIQP) or "perspective" (incumbent + certified conic bound; not exact).
    conic_solver : "CLARABEL" (default) or "SCS" for the relaxation.
    shift : the relaxation's split: "auto" (λ_min(H)), "damping" (λ) or a number.
    low_rank : MIQP form (None: the one with fewer nonzeros, see ``formulations.canonical``).
    rel_gap : the MIP gap asked of the solver (default 1e-9).
    threads : Gurobi's thread count (default: Gurobi's own choice, all cores); SCIP solves on one thread.
    """

    name = "cvxpy"

    def __init__(
        self,
        solver: str = "SCIP",
        relaxation: str | None = None,
        conic_solver: str = "CLARABEL",
        shift: str | float = "auto",
        low_rank: bool | None = None,
        rel_gap: float = 1e-9,
        threads: int | None = None,
    ) -> None:
        if solver not in _MIP_SOLVERS:
            raise invalid_option("solver", "CvxpySolver()", f"one of {', '.join(_MIP_SOLVERS)}", repr(solver))
        if relaxation not in (None, "perspective"):
            raise invalid_option("relaxation", "CvxpySolver()", "None or 'perspective'", repr(relaxation))
        if conic_solver not in _CONIC_SOLVERS:
            raise invalid_option("conic_solver", "CvxpySolver()", f"one of {', '.join(_CONIC_SOLVERS)}", repr(conic_solver))
        if not (shift in ("auto", "damping") or (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0)):
            raise invalid_option("shift", "CvxpySolver()", "'auto', 'damping' or a number > 0", repr(shift))
        if isinstance(rel_gap, bool) or not isinstance(rel_gap, (int, float)) or not 0 <= rel_gap < 1:
            raise invalid_option("rel_gap", "CvxpySolver()", "a number in [0, 1)", repr(rel_gap))
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise invalid_option("threads", "CvxpySolver()", "None or an integer >= 1", repr(threads))
        self.threads = threads
        self.solver = solver
        self.relaxation = relaxation
        self.conic_solver = conic_solver
        self.shift = shift
        self.low_rank = low_rank
        self.rel_gap = float(rel_gap)
        requires, extra = _MIP_SOLVERS[solver]
        if relaxation is not None:
            requires, extra = ("cvxpy",), "cvxpy"
        self.capabilities = Capabilities(
            exact=relaxation is None,
            reports_bound=True,
            max_size=512,
            warm_start=True,
            requires=requires,
            extra=extra,
            description=(
                f"Big-M MIQP through cvxpy + {solver}" if relaxation is None
                else f"Perspective-relaxation bound through cvxpy + {conic_solver} (not exact)"
            ),
        )

    def _params(self, time_limit: float | None) -> dict[str, Any]:
        if self.solver == "SCIP":
            params: dict[str, Any] = {"limits/gap": self.rel_gap, "display/verblevel": 0}
            if time_limit is not None:
                params["limits/time"] = float(time_limit)
            return {"scip_params": params}
        opts: dict[str, Any] = {"MIPGap": self.rel_gap, "OutputFlag": 0}
        if self.threads is not None:
            opts["Threads"] = self.threads
        if time_limit is not None:
            opts["TimeLimit"] = float(time_limit)
        return opts

    def _native_bound(self, prob: Any, offset_ok: bool) -> tuple[float | None, str | None]:
        """(the solver's dual bound in our objective's units, its native status)."""
        stats = prob.solver_stats.extra_stats if prob.solver_stats is not None else None
        try:
            if self.solver == "SCIP" and isinstance(stats, dict) and "model" in stats:
                model = stats["model"]
                status = str(model.getStatus())
                if not offset_ok or model.getNSols() == 0:
                    return None, status
                offset = float(prob.value) - float(model.getSolObjVal(model.getBestSol()))
                return float(model.getDualbound()) + offset, status
            if self.solver == "GUROBI" and stats is not None:
                status = str(stats.Status)
                if not offset_ok or stats.SolCount == 0:
                    return None, status
                offset = float(prob.value) - float(stats.ObjVal)
                return float(stats.ObjBound) + offset, status
        except Exception:  # noqa: BLE001 - a bound we cannot read is simply not reported
            return None, None
        return None, None

    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Exact MIQP (or the relaxation bound) from the heuristic incumbent; never worse than it."""
        self.ensure_available()
        cp = _cp()
        start = time.perf_counter()
        deadline = None if options.time_limit is None else start + options.time_limit
        evaluator = DenseEvaluator(problem)
        best_S, best_val, info = heuristic_incumbent(problem, evaluator, warm_start, deadline)
        info["backend"] = self.solver if self.relaxation is None else self.conic_solver

        def result(bound, status, term):
            bound = None if bound is None or not math.isfinite(bound) else min(bound, best_val)
            return SolveResult(
                support=best_S.copy(), objective=best_val, bound=bound, gap=relative_gap(best_val, bound),
                status=status, termination=term, wall_time=time.perf_counter() - start, solver=self.name, extra=info,
            )

        n, k = problem.n, problem.n_keep
        if k == 0 or k == n:
            return result(best_val, Status.OPTIMAL if self.relaxation is None else Status.FEASIBLE,
                          Termination.OPTIMAL if self.relaxation is None else Termination.COMPLETED)
        if self.relaxation == "perspective":
            bound, conic = perspective_bound(problem, self.shift, self.conic_solver)
            info["conic_value"] = conic if math.isfinite(conic) else None
            return result(bound, Status.FEASIBLE, Termination.COMPLETED)

        if deadline is not None and deadline - time.perf_counter() < _MIN_SOLVE_SECONDS:
            return result(None, Status.FEASIBLE, Termination.TIME_LIMIT)
        # solver tolerances are absolute: solve the block scaled to an incumbent value of 1 (scaled_problem)
        scale = objective_scale(best_val)
        info["objective_scale"] = scale
        canonical = miqp_model(scaled_problem(problem, scale), upper_bound=best_val * scale, low_rank=self.low_rank)
        prob, groups = cvxpy_problem(canonical)
        remaining = None if deadline is None else deadline - time.perf_counter()
        if remaining is not None and remaining < _MIN_SOLVE_SECONDS:
            return result(None, Status.FEASIBLE, Termination.TIME_LIMIT)
        try:
            with warnings.catch_warnings():
                # "Solution may be inaccurate" is how cvxpy reports SCIP's time limit: mapped below
                warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                prob.solve(solver=self.solver, verbose=False, **self._params(remaining))
        except Exception as exc:  # noqa: BLE001 - a backend failure returns the incumbent, honestly labelled
            info["error"] = f"{type(exc).__name__}: {exc}"
            late = deadline is not None and time.perf_counter() >= deadline
            return result(None, Status.FEASIBLE, Termination.TIME_LIMIT if late else Termination.ERROR)
        status = prob.status
        info["cvxpy_status"] = status
        z = groups["z"].value
        if z is not None:
            S = np.zeros(n, dtype=bool)
            S[np.argsort(-np.asarray(z), kind="stable")[:k]] = True
            val = float(evaluator.values(S[None, :])[0])
            if val < best_val:
                best_S, best_val = S, val
        bound, native = self._native_bound(prob, offset_ok=z is not None and prob.value is not None
                                           and math.isfinite(prob.value))
        info["native_status"] = native
        if bound is not None:
            bound /= scale
        if status == cp.OPTIMAL:
            if bound is None:
                bound = float(prob.value) / scale
            if best_val - bound <= (self.rel_gap + _CLAIM_RTOL) * max(abs(best_val), 1e-12):
                return result(bound, Status.OPTIMAL, Termination.OPTIMAL)
            info["note"] = "solver claimed optimality but its bound does not match the re-scored support"
            return result(bound, Status.FEASIBLE, Termination.ERROR)
        if status == cp.OPTIMAL_INACCURATE:
            # SCIP's time/gap/node limits arrive here: never optimal
            if native is not None and "node" in native:
                term = Termination.ITERATION_LIMIT
            elif native is None or "time" in native or native == "9":
                term = Termination.TIME_LIMIT
            else:
                term = Termination.TIME_LIMIT if deadline is not None else Termination.ERROR
            return result(bound, Status.FEASIBLE, term)
        info.setdefault("error", f"cvxpy status {status}")
        timed_out = deadline is not None and time.perf_counter() >= deadline - 0.5
        return result(bound, Status.FEASIBLE, Termination.TIME_LIMIT if timed_out else Termination.ERROR)
