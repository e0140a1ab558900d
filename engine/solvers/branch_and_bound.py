"""Exact best-first branch-and-bound on z ∈ {0,1}ⁿ with perspective bounds, in numpy ("bnb").

**Nodes.** A node fixes some weights in (I, kept) and some out (O, pruned); the free ones F choose
k' = k − |I| more. Its subproblem is reduced exactly (``formulations.cuts.restrict``): d_O = −w_O is
substituted and d_I minimised out by a Schur complement, which leaves an instance of the same form on F
(H_F (m×m), b_F, w_F, a constant, k').

**Bound.** The perspective (Boolean) relaxation of the node's subproblem with the split H_F = A + δI,
δ = λ_min(H_F) (``formulations.cuts`` module docstring), solved by FISTA on v with the closed-form
k-support prox, reading a certified bound LB(d) at every iterate, warm-started from the parent's iterate.
Two things make it strong: (1) δ = λ_min(H_F) instead of λ: ~10× λ at the root on Gaussian data, and it
grows down the tree, because principal submatrices and Schur complements of an SPD matrix have
λ_min ≥ that of the matrix; (2) the reduction is exact, so fixed coordinates cost nothing in bound
quality. On the benchmark (k = n/2, N = 2n, λ = 1e-2) the root gap is ~25-50 % yet the trees are small
(tens to hundreds of nodes at n = 20-30).

**Variable fixing** (reduced costs, free with the same dual point d). With c = c(d), T the k' largest,
LB = base − Σ_T c: forcing a free i ∉ T in gives LB + c_(k') − c_i, forcing i ∈ T out gives
LB + c_i − c_(k'+1) (each a valid bound of that child). When it reaches the incumbent the child is
empty, so i is fixed the other way; the node is then re-reduced and re-bounded (a few rounds).

**Incumbent.** Best of the warm start, magnitude, WoodFisher (OBS scores) and greedy OBS elimination,
improved by best-improvement swap local search on the exact E(S) (all k(n − k) swaps scored by batched
m×m solves, m = min(k, n − k)); in the tree, each node's relaxed solution is rounded (I ∪ top-k' of z)
and scored exactly; a new incumbent found that way gets a few passes of the same swap search.

**Search.** Best-first (lowest bound first); a node is pruned when LB ≥ UB − tol, tol = max(rel_gap·|UB|,
abs_gap). Branching variable: the largest fractional z_i of the node's relaxation (equivalently the
largest |v_i| among the undecided coordinates; 3.5× fewer nodes than the most fractional one). Stops with OPTIMAL when the heap empties; with a time or node limit it returns the incumbent,
the global bound min(open bounds) and the gap (Termination.TIME_LIMIT / ITERATION_LIMIT).

Dense: O(n²) memory, O(n³) per node; for blocks up to a few hundred weights (max_size = 512).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np

from formulations.cuts import (
    DenseSubproblem,
    dense_subproblem,
    perspective_shift,
    restrict,
    solve_perspective,
)
from formulations.objective import optimal_update, relative_gap
from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, spd_inverse, top_k_support

__all__ = ["BranchAndBoundSolver", "swap_local_search", "heuristic_incumbent", "DenseEvaluator"]


# ----------------------------------------------------------------------------------- exact E(S), batched
class DenseEvaluator:
    """E(S) for many supports of one block from dense H (n×n) and H⁻¹, float64.

    Pruned side (|P| ≤ |S|): with G = H⁻¹ and u = w − Gg, E(S) = −½ gᵀGg + ½ u_Pᵀ (G_PP)⁻¹ u_P.
    Kept side: E(S) = ½ w_PᵀH_PP w_P − g_Pᵀw_P − ½ b_Sᵀ H_SS⁻¹ b_S with b_S = g_S − H_SP w_P, where
    w_PᵀH_PPw_P = wᵀHw − 2 w_Sᵀ(Hw)_S + w_SᵀH_SS w_S. Both are exact for any g; the side with the
    smaller m = min(k, n − k) is used (batched m×m solves).
    """

    def __init__(self, problem: BlockProblem, hessian: np.ndarray | None = None) -> None:
        self.n, self.k = problem.n, problem.n_keep
        self.H = problem.dense_hessian() if hessian is None else hessian
        self.w = problem.weights
        self.g = problem.gradient if problem.gradient is not None else np.zeros(self.n)
        self.pruned_side = (self.n - self.k) <= self.k
        if self.pruned_side:
            self.G = spd_inverse(self.H)  # symmetric by construction
            Gg = self.G @ self.g
            self.u = self.w - Gg
            self.base = -0.5 * float(self.g @ Gg)
        else:
            self.Hw = self.H @ self.w
            self.wHw = float(self.w @ self.Hw)
            self.gw = float(self.g @ self.w)

    def side_sets(self, supports: np.ndarray) -> np.ndarray:
        """(B, m) sorted indices of the evaluated side (pruned or kept) of each support (B, n) bool."""
        side = ~supports if self.pruned_side else supports
        m = self.n - self.k if self.pruned_side else self.k
        return np.nonzero(side)[1].reshape(side.shape[0], m)

    def values(self, supports: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """E(S) for each row of ``supports`` (B, n) bool; shape (B,)."""
        supports = np.atleast_2d(np.asarray(supports, dtype=bool))
        out = np.empty(supports.shape[0])
        for s0 in range(0, supports.shape[0], chunk):
            out[s0 : s0 + chunk] = self._values(self.side_sets(supports[s0 : s0 + chunk]))
        return out

    def _values(self, idx: np.ndarray) -> np.ndarray:
        B, m = idx.shape
        if m == 0:
            if self.pruned_side:
                return np.full(B, self.base)
            return np.full(B, 0.5 * self.wHw - self.gw)
        if self.pruned_side:
            A = self.G[idx[:, :, None], idx[:, None, :]]
            uP = self.u[idx]
            sol = np.linalg.solve(A, uP[..., None])[..., 0]
            return self.base + 0.5 * np.einsum("bi,bi->b", uP, sol)
        A = self.H[idx[:, :, None], idx[:, None, :]]
        wS, gS, HwS = self.w[idx], self.g[idx], self.Hw[idx]
        AwS = np.einsum("bij,bj->bi", A, wS)
        bS = gS - HwS + AwS
        wPHwP = self.wHw - 2.0 * np.einsum("bi,bi->b", wS, HwS) + np.einsum("bi,bi->b", wS, AwS)
        sol = np.linalg.solve(A, bS[..., None])[..., 0]
        gPwP = self.gw - np.einsum("bi,bi->b", gS, wS)
        return 0.5 * wPHwP - gPwP - 0.5 * np.einsum("bi,bi->b", bS, sol)


def swap_local_search(
    evaluator: DenseEvaluator, support: np.ndarray, deadline: float | None = None, max_passes: int = 1000
) -> tuple[np.ndarray, float, int]:
    """Best-improvement single-swap local search on the exact E(S).

    Each pass scores all k(n − k) swaps (one kept weight out, one pruned weight in), in batches of at most
    ~2²² matrix entries (m×m each, m = min(k, n − k)), and takes the best if it lowers E by more than
    rounding (1e-12 relative). The ``deadline`` is checked between batches too (one pass at n = 200 takes
    seconds): past it, the best swap scored so far is made if it improves, and the search stops.
    Returns (support, E, passes).
    """
    S = np.asarray(support, dtype=bool).copy()
    value = float(evaluator.values(S[None, :])[0])
    passes = 0
    kept, pruned = np.flatnonzero(S), np.flatnonzero(~S)
    if kept.size == 0 or pruned.size == 0:
        return S, value, 0
    m = min(kept.size, pruned.size)
    batch = max(1, min(4096, 2**22 // (m * m)))
    late = False
    while passes < max_passes and not late:
        if deadline is not None and time.perf_counter() > deadline:
            break
        passes += 1
        kept, pruned = np.flatnonzero(S), np.flatnonzero(~S)
        ii, jj = np.meshgrid(kept, pruned, indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        best_val, best = math.inf, None
        for b0 in range(0, ii.size, batch):
            if b0 and deadline is not None and time.perf_counter() > deadline:
                late = True
                break
            rows = np.arange(min(batch, ii.size - b0))
            cand = np.repeat(S[None, :], rows.size, axis=0)
            cand[rows, ii[b0 : b0 + rows.size]] = False
            cand[rows, jj[b0 : b0 + rows.size]] = True
            vals = evaluator.values(cand)
            b = int(np.argmin(vals))
            if vals[b] < best_val:  # strict: the first of equal values, as one argmin over the pass
                best_val, best = float(vals[b]), cand[b].copy()
        if best is not None and best_val < value - 1e-12 * max(1.0, abs(value)):
            S, value = best, best_val
        else:
            break
    return S, value, passes


def heuristic_incumbent(
    problem: BlockProblem,
    evaluator: DenseEvaluator,
    warm_start: np.ndarray | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, float, dict]:
    """Best of warm start / magnitude / WoodFisher / greedy OBS, then swap local search. Returns
    (support, E, info) with info = {"start_values": {...}, "start": name, "swap_passes": int}."""
    k = problem.n_keep
    candidates: dict[str, np.ndarray] = {}
    if warm_start is not None:
        candidates["warm_start"] = np.asarray(warm_start, dtype=bool)
    candidates["magnitude"] = top_k_support(np.abs(problem.weights), k)
    if evaluator.pruned_side:
        diag_inv = np.diag(evaluator.G)
    else:
        diag_inv = np.diag(np.linalg.inv(evaluator.H))
    candidates["woodfisher"] = top_k_support(problem.weights**2 / np.maximum(diag_inv, 1e-300), k)
    try:
        from .greedy import obs_elimination  # another module of this package; optional for robustness

        path = obs_elimination(problem, deadline=deadline)
        s = np.ones(problem.n, dtype=bool)
        s[path.removed] = False
        candidates["greedy"] = s
    except Exception:  # noqa: BLE001 - the greedy start is an optimisation, never a requirement
        pass
    names = list(candidates)
    vals = evaluator.values(np.stack([candidates[c] for c in names]))
    start_values = {nm: float(v) for nm, v in zip(names, vals)}
    order = np.argsort(vals, kind="stable")
    best_name = names[int(order[0])]
    S, value, passes = swap_local_search(evaluator, candidates[best_name], deadline)
    info = {"start_values": start_values, "start": best_name, "swap_passes": passes}
    if warm_start is not None and start_values["warm_start"] <= value:
        # never worse than the warm start, to the last bit
        S, value = candidates["warm_start"].copy(), start_values["warm_start"]
    return S, value, info


# ------------------------------------------------------------------------------------------ the search
@dataclass(order=True)
class _Node:
    bound: float
    order: int
    keep: np.ndarray = field(compare=False)  # (n,) bool, forced in
    prune: np.ndarray = field(compare=False)  # (n,) bool, forced out
    v: np.ndarray = field(compare=False)  # (m,) relaxed iterate on the free coordinates (warm start)
    z: np.ndarray = field(compare=False)  # (m,) relaxed z
    scores: np.ndarray = field(compare=False)  # (m,) c at the best dual point
    depth: int = field(compare=False, default=0)


class BranchAndBoundSolver(SubsetSolver):
    """Best-first branch-and-bound with node-wise perspective bounds (module docstring). Exact.

    Parameters
    ----------
    rel_gap : relative optimality tolerance (default 1e-9): a node is pruned when LB ≥ UB − max(rel_gap·|UB|,
        abs_gap); OPTIMAL means the final gap is within it.
    abs_gap : absolute tolerance (default 1e-12).
    max_nodes : node limit (default None: unlimited); reaching it returns ITERATION_LIMIT.
    fixing_rounds : rounds of reduced-cost fixing per node (default 3; 0 disables).
    relaxation_iters : FISTA iterations per node bound (default 200).
    polish_passes : swap local-search passes applied to each new incumbent found in the tree (default 3).
    """

    name = "bnb"
    capabilities = Capabilities(
        exact=True,
        reports_bound=True,
        max_size=512,
        warm_start=True,
        description="Exact best-first branch-and-bound with node-wise perspective bounds (numpy; small blocks).",
    )

    def __init__(
        self,
        rel_gap: float = 1e-9,
        abs_gap: float = 1e-12,
        max_nodes: int | None = None,
        fixing_rounds: int = 3,
        relaxation_iters: int = 200,
        polish_passes: int = 3,
    ) -> None:
        for nm, val in (("rel_gap", rel_gap), ("abs_gap", abs_gap)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 <= val < 1):
                raise invalid_option(nm, "BranchAndBoundSolver()", "a number in [0, 1)", repr(val))
        if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
            raise invalid_option("max_nodes", "BranchAndBoundSolver()", "None or an integer >= 1", repr(max_nodes))
        for nm, val, lo in (
            ("fixing_rounds", fixing_rounds, 0),
            ("relaxation_iters", relaxation_iters, 1),
            ("polish_passes", polish_passes, 0),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise invalid_option(nm, "BranchAndBoundSolver()", f"an integer >= {lo}", repr(val))
        self.rel_gap = float(rel_gap)
        self.abs_gap = float(abs_gap)
        self.max_nodes = max_nodes
        self.fixing_rounds = fixing_rounds
        self.relaxation_iters = relaxation_iters
        self.polish_passes = polish_passes

    # ------------------------------------------------------------------------------------------ solve
    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Prove the optimal support (or return the incumbent, bound and gap at the time/node limit)."""
        start = time.perf_counter()
        deadline = None if options.time_limit is None else start + options.time_limit
        n, k = problem.n, problem.n_keep
        evaluator = DenseEvaluator(problem)
        best_S, best_val, info = heuristic_incumbent(problem, evaluator, warm_start, deadline)
        info["heuristic_time"] = time.perf_counter() - start
        info["heuristic_value"] = best_val
        root = dense_subproblem(problem)
        root = DenseSubproblem(evaluator.H, root.weights, root.linear, 0.0, k, root.index)
        search = _Search(self, root, problem.damping, evaluator, best_S, best_val, deadline)
        nodes = 0
        heap: list[_Node] = []
        termination = Termination.OPTIMAL
        root_bound = best_val

        if 0 < k < n:
            none = np.zeros(n, dtype=bool)
            x0 = optimal_update(problem, best_S, options.memo).weights
            for child in search.evaluate(root, none, none.copy(), x0, 0):
                heapq.heappush(heap, child)
            nodes = 1
            root_bound = heap[0].bound if heap else search.best_value
        while heap:
            if heap[0].bound >= search.threshold():
                heap.clear()  # every open node is pruned by the incumbent
                break
            if deadline is not None and time.perf_counter() > deadline:
                termination = Termination.TIME_LIMIT
                break
            if self.max_nodes is not None and nodes >= self.max_nodes:
                termination = Termination.ITERATION_LIMIT
                break
            node = heapq.heappop(heap)
            sub = restrict(root, node.keep, node.prune)
            j = self._branch_index(node)
            gj = int(sub.index[j])
            v0 = np.delete(node.v, j)
            for fix_in in (True, False):
                keep, prune = node.keep.copy(), node.prune.copy()
                local = np.zeros(sub.size, dtype=bool)
                local[j] = True
                none_local = np.zeros(sub.size, dtype=bool)
                if fix_in:
                    keep[gj] = True
                    child = restrict(sub, local, none_local)
                else:
                    prune[gj] = True
                    child = restrict(sub, none_local, local)
                nodes += 1
                for item in search.evaluate(child, keep, prune, v0, node.depth + 1):
                    heapq.heappush(heap, item)
        best_S, best_val = search.best_support, search.best_value
        # the global bound: the lowest open node (none open: the incumbent is proven)
        global_bound = min(heap[0].bound, best_val) if heap else best_val
        optimal = termination == Termination.OPTIMAL
        info.update({"nodes": nodes, "root_bound": root_bound, "open_nodes": len(heap),
                     "tree_improvements": search.improvements})
        return SolveResult(
            support=best_S.copy(),
            objective=best_val,
            bound=global_bound,
            gap=relative_gap(best_val, global_bound),
            status=Status.OPTIMAL if optimal else Status.FEASIBLE,
            termination=termination,
            wall_time=time.perf_counter() - start,
            iterations=nodes,
            solver=self.name,
            extra=_jsonable(info),
        )

    @staticmethod
    def _branch_index(node: _Node) -> int:
        """Among the fractional z_i, the largest (= the largest |v_i|: on the tied set z_i ∝ |v_i|).

        Measured on the benchmark (n = 50-70): 3.5× fewer nodes than the most fractional z_i, which most
        often picks coordinates whose "in" child changes nothing. With an integral z, branch where the
        dual scores are least decided (nearest the top-k' threshold).
        """
        frac = np.minimum(node.z, 1.0 - node.z)
        cand = np.flatnonzero(frac > 1e-6)
        if cand.size:
            return int(cand[np.argmax(np.abs(node.v[cand]))])
        c = node.scores
        kk = min(max(int(round(node.z.sum())), 1), c.size - 1)
        srt = np.sort(c)[::-1]
        tau = 0.5 * (srt[kk - 1] + srt[kk])
        return int(np.argmin(np.abs(c - tau)))


class _Search:
    """The mutable state of one branch-and-bound run: incumbent, seen supports, node counter."""

    def __init__(
        self,
        solver: BranchAndBoundSolver,
        root: DenseSubproblem,
        damping: float,
        evaluator: DenseEvaluator,
        best_support: np.ndarray,
        best_value: float,
        deadline: float | None = None,
    ) -> None:
        self.solver = solver
        self.deadline = deadline
        self.root = root
        self.damping = damping
        self.evaluator = evaluator
        self.best_support = best_support
        self.best_value = best_value
        self.seen: set[bytes] = set()
        self.counter = 0
        self.improvements = 0

    def threshold(self) -> float:
        """Nodes whose bound reaches this are pruned: UB − max(rel_gap·|UB|, abs_gap)."""
        ub = self.best_value
        return ub - max(self.solver.rel_gap * abs(ub), self.solver.abs_gap)

    def offer(self, support: np.ndarray) -> None:
        """Score a support exactly (once) and keep it if it beats the incumbent."""
        key = np.packbits(support).tobytes()
        if key in self.seen:
            return
        self.seen.add(key)
        value = float(self.evaluator.values(support[None, :])[0])
        if value < self.best_value:
            # a new incumbent from the tree: polish it by a few passes of swap local search
            S, value, _ = swap_local_search(self.evaluator, support, self.deadline, self.solver.polish_passes)
            self.seen.add(np.packbits(S).tobytes())
            self.best_support, self.best_value = S, value
            self.improvements += 1

    def evaluate(
        self, sub: DenseSubproblem, keep: np.ndarray, prune: np.ndarray, v0: np.ndarray, depth: int
    ) -> list[_Node]:
        """Bound a node (with reduced-cost fixing); return [] when pruned or solved, else [node]."""
        rounds = 0
        while True:
            m, kk = sub.size, sub.n_keep
            if kk == 0 or kk == m:
                # a leaf: the support is determined
                S = keep.copy()
                if kk == m:
                    S[sub.index] = True
                self.offer(S)
                return []
            delta, lip = perspective_shift(sub.hessian, self.damping)
            res = solve_perspective(
                sub, delta, lip, v0=v0, upper=self.threshold(), max_iter=self.solver.relaxation_iters
            )
            # rounding: fixed-in plus the k' free coordinates with the largest z (then |v|)
            order = np.lexsort((-np.abs(res.v), -res.z))[:kk]
            S = keep.copy()
            S[sub.index[order]] = True
            self.offer(S)
            thr = self.threshold()
            if res.bound >= thr:
                return []
            if rounds >= self.solver.fixing_rounds:
                break
            c = res.scores
            srt = np.sort(c)[::-1]
            ck, ck1 = srt[kk - 1], srt[kk]
            top = np.zeros(m, dtype=bool)
            top[np.argsort(-c, kind="stable")[:kk]] = True
            fix_out = (~top) & (res.bound + ck - c >= thr)
            fix_in = top & (res.bound + c - ck1 >= thr)
            if not (fix_out.any() or fix_in.any()):
                break
            if fix_in.sum() > kk or (m - fix_out.sum()) < kk:
                return []  # no completion of this node beats the incumbent
            keep = keep.copy()
            prune = prune.copy()
            keep[sub.index[fix_in]] = True
            prune[sub.index[fix_out]] = True
            v0 = res.v[~(fix_in | fix_out)]
            sub = restrict(sub, fix_in, fix_out)
            rounds += 1
        self.counter += 1
        return [_Node(res.bound, self.counter, keep, prune, res.v, res.z, res.scores, depth)]


def _jsonable(info: dict) -> dict:
    out = {}
    for key, val in info.items():
        if isinstance(val, dict):
            out[key] = _jsonable(val)
        elif isinstance(val, (np.floating, float)):
            out[key] = float(val) if math.isfinite(val) else None
        elif isinstance(val, (np.integer, int)):
            out[key] = int(val)
        else:
            out[key] = val
    return out
