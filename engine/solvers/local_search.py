"""CBS-S: the Combinatorial Brain Surgeon's selection step (Yu et al., ICML 2022, Algorithm 1).

Two phases, as in the official code (``yuxwind/CBS``: ``pruners/comb_pruner.py``, ``greedy_alg/greedy.py``):

1. **RMP start** (randomized magnitude pruning, "mag_perb"). Trial 0 is global magnitude; trial t ≥ 1
   shuffles the n weights (seeded), cuts the shuffled order into ``C = min(⌊√n⌋, 1000)`` chunks of
   ``c = ⌈n/C⌉`` weights and keeps the largest |w| inside each chunk, ⌈c·k/n⌉ or ⌊c·k/n⌋ per chunk so
   that exactly k are kept (:func:`rmp_chunk_quotas`). Each mask is scored by ``options.evaluate``
   (the model loss with the mask applied, no update) or, without it, by the selection objective
   below; the best mask starts the search.

2. **Swap local search** on the CBS-S binary QP. With z ∈ {0,1}ⁿ (1 = kept), u = w ⊙ (1 − z) the pruned
   part of w (shape (n,)), X (N, n) the factor (F = XᵀX) and H = F + λI,

       f(z) = q(w ⊙ z) = ½ uᵀ H u − gᵀu = ½‖r‖² + (λ/2)‖u‖² − gᵀu,      r = X u  (N,),

   i.e. ``formulations.objective.selection_objective``; the paper's w_PᵀF_PPw_P is 2f at λ = 0, g = 0.
   With s = Xᵀ r = F u (n,) and d = diag F:

   - restoring a pruned weight p (u_p: w_p → 0) lowers f by the *gain*
         a_p = w_p s_p − ½ d_p w_p² + (λ/2) w_p² − g_p w_p,
   - pruning a kept weight q (u_q: 0 → w_q) raises f by the *cost*
         b_q = w_q s_q + ½ (d_q + λ) w_q² − g_q w_q,
   - doing both at once (a swap) changes f by exactly
         Δf(p, q) = b_q − a_p − w_p w_q F_pq,       F_pq = X_pᵀ X_q,
     since f is quadratic and the only cross term of the two moves is −w_p w_q F_pq.

   (The official code's α = 2a, β = 2b, γ = 2 w_p w_q F_pq at λ = 0, g = 0.) A pass sorts the pruned
   weights by a (descending) and the kept weights by b_q − w_q w_{p₀} F_{q p₀} (ascending, the cost of
   swapping with the top pruned weight p₀). The pair of rank (0, 0) is tried first: if it does not
   improve by ε, the search stops (a local optimum in the official code's sense). Then the pruned weight
   of rank i = 1, 2, … is paired with the first still-unused kept weight of rank j ∈ [max(1, i − ρ),
   i + ρ) whose swap improves by ε; a pruned weight that finds none is a failure, and the pass ends
   after more than τ failures. Every candidate is scored with the *current* r, so each accepted swap
   lowers f by exactly its recorded gain. After each pass the support is scored (``evaluate`` or f)
   and the best pass is returned; the search stops after ``max_passes`` passes, at a local optimum, or
   when the evaluated loss has not improved for ``patience`` passes.

**Threshold scale.** ε is absolute and, as in the official code, measured on the paper's objective
w_PᵀH_PPw_P − 2g_Pᵀw_P = 2f: a swap is accepted iff 2·(−Δf) ≥ ε (and −Δf > 0).

**Cost and precision** (n = 32,360 weights, N = 10,000 rows, float32 X). Nothing n×n is formed. X is
held column-major (Xᵀ, (n, N) C-contiguous; a blocked transpose, free when X is already Fortran-ordered)
so that one weight's column is a contiguous row. r is kept in float64 and updated in O(N) per accepted
swap (r += w_q X_q − w_p X_p). A pass costs one product Xᵀ[r, X_{p₀}] (O(Nn), float32 when X is: it
only orders candidates) plus O(N·ρ) per visited pruned weight: the kept candidates' columns live in a
ring buffer of 2ρ float64 rows that slides with i, and every gain that decides a swap is computed in
float64 from the exact columns and the current r. The start's r is computed once in float64 (chunked).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from formulations.problem import BlockProblem

from ..errors import invalid_option
from ..options import SolveOptions
from ..progress import progress
from ..result import SolveResult, Status, Termination
from .base import Capabilities, SubsetSolver, top_k_support
from .selection_qp import SelectionState, _selection_objectives, column_major

__all__ = [
    "CBSSolver",
    "SelectionState",
    "randomized_magnitude_support",
    "rmp_chunk_quotas",
    "column_major",
]

#: masks scored together by one matrix product in the RMP phase
_RMP_BATCH = 16


# --------------------------------------------------------------------------------------- helpers
def rmp_chunk_quotas(n: int, n_keep: int) -> tuple[int, np.ndarray]:
    """Chunk size and per-chunk keep quotas of randomized magnitude pruning.

    ``C = max(1, min(⌊√n⌋, 1000))`` chunks of ``c = ⌈n/C⌉`` weights (the last one shorter). Chunk j of
    length ℓ_j keeps ⌊ℓ_j·k/n⌋ or ⌈ℓ_j·k/n⌉ weights: the ceiling for the leading chunks, the floor for
    the rest, so that the quotas sum to exactly k and no chunk is emptied. (The official code gives
    every chunk but the last ⌈c·(1 − sparsity)⌉ and the last one the remainder, clipped at 0, which
    overshoots k whenever the ceiling rounds up: at n = 32,360, k = 3,236 it keeps 178·19 = 3,382.)

    Returns ``(c, quotas)`` with quotas (number of chunks,) int64.
    """
    n_chunks = max(1, min(math.isqrt(n), 1000))
    size = math.ceil(n / n_chunks)
    lengths = np.minimum(size, n - np.arange(0, n, size)).astype(np.int64)
    quotas = lengths * n_keep // n
    quotas[: n_keep - int(quotas.sum())] += 1  # fewer than C chunks short, each below its length
    return size, quotas


def randomized_magnitude_support(weights: np.ndarray, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """One RMP mask (n,) bool with exactly ``n_keep`` True: shuffle, chunk, keep each chunk's top |w|.

    See :func:`rmp_chunk_quotas` for the chunks and quotas. Ties inside a chunk go to the earlier
    position in the shuffled order.
    """
    w = np.abs(np.asarray(weights, dtype=np.float64))
    n = w.size
    size, quotas = rmp_chunk_quotas(n, n_keep)
    perm = rng.permutation(n)
    padded = np.full(quotas.size * size, -np.inf)  # padding ranks last, and quotas never reach it
    padded[:n] = w[perm]
    order = np.argsort(-padded.reshape(quotas.size, size), axis=1, kind="stable")
    chunk, rank = np.nonzero(np.arange(size)[None, :] < quotas[:, None])  # the top quota_c ranks of chunk c
    mask = np.zeros(n, dtype=bool)
    mask[perm[chunk * size + order[chunk, rank]]] = True
    return mask


# ------------------------------------------------------------------------------------ the solver
@dataclass
class _PassOutcome:
    swaps: int = 0
    visited: int = 0
    failures: int = 0
    timed_out: bool = False
    moves: list = field(default_factory=list)


class CBSSolver(SubsetSolver):
    """CBS-S selection: best of ``rmp_trials`` randomized magnitude masks, then swap local search.

    Parameters (defaults = the paper and the official scripts)
    ----------
    rmp_trials : R ≥ 1 masks in the RMP start (trial 0 = global magnitude). 50.
    epsilon : ε ≥ 0, the least decrease of 2f (the paper's w_PᵀH_PPw_P scale) for a swap. 1e-4.
    rho : ρ ≥ 1, half-width of the window of kept ranks [i − ρ, i + ρ) tried for pruned rank i. 10.
    tau : τ ≥ 0, a pass ends once more than τ pruned weights found no swap. 20.
    max_passes : ≥ 0 swap passes at most (0: RMP only). 100.
    patience : stop when the pass score has not beaten its best for this many passes and the
        last pass is worse (the official "max_N_fluctation" = 5); None disables it. 5.
    record_moves : store every accepted swap in ``extra["moves"]`` as [pass, restored p, pruned q,
        gain −Δf]. False.

    ``warm_start`` (a support of size k) replaces the RMP phase. The result's ``extra``: ``rmp_losses``,
    ``rmp_best_trial``, ``rmp_score`` ("evaluate" / "selection_objective" / "warm_start"), ``passes`` (that
    changed the support),
    ``swaps``, ``pass_swaps``, ``pass_losses`` / ``pass_objectives`` (index 0 = the start), ``best_pass``,
    ``stop_reason``, ``timing`` (wall seconds: setup (Xᵀ), rmp, search, of which start_state (the start's
    exact r and diag F), total; evaluate = the part of rmp and search spent inside ``options.evaluate``).
    """

    name = "cbs"
    capabilities = Capabilities(
        warm_start=True,
        description="CBS-S: randomized magnitude start + swap local search on the binary QP (Yu et al. 2022).",
    )

    def __init__(
        self,
        rmp_trials: int = 50,
        epsilon: float = 1e-4,
        rho: int = 10,
        tau: int = 20,
        max_passes: int = 100,
        patience: int | None = 5,
        record_moves: bool = False,
    ) -> None:
        where = "CBSSolver"
        self.rmp_trials = _int_at_least(rmp_trials, 1, "rmp_trials", where)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)) or not (
            np.isfinite(epsilon) and epsilon >= 0
        ):
            raise invalid_option("epsilon", where, "a finite number >= 0", repr(epsilon))
        self.epsilon = float(epsilon)
        self.rho = _int_at_least(rho, 1, "rho", where)
        self.tau = _int_at_least(tau, 0, "tau", where)
        self.max_passes = _int_at_least(max_passes, 0, "max_passes", where)
        self.patience = None if patience is None else _int_at_least(patience, 1, "patience", where)
        if not isinstance(record_moves, (bool, np.bool_)):
            raise invalid_option("record_moves", where, "True or False", repr(record_moves))
        self.record_moves = bool(record_moves)

    # ------------------------------------------------------------------------------- solve
    def solve(
        self, problem: BlockProblem, options: SolveOptions, warm_start: np.ndarray | None = None
    ) -> SolveResult:
        """Run RMP + swap passes; return the best support found (see the class docstring)."""
        t0 = time.perf_counter()
        deadline = None if options.time_limit is None else t0 + options.time_limit
        n, k = problem.n, problem.n_keep
        timing = {"setup": 0.0, "rmp": 0.0, "start_state": 0.0, "search": 0.0, "evaluate": 0.0, "total": 0.0}
        extra: dict[str, Any] = {
            "rmp_losses": [], "rmp_best_trial": None, "rmp_score": None, "passes": 0, "swaps": 0,
            "pass_swaps": [], "pass_losses": [], "pass_objectives": [], "best_pass": 0,
            "stop_reason": "", "epsilon": self.epsilon, "rho": self.rho, "tau": self.tau, "timing": timing,
        }
        if k in (0, n):  # nothing to choose
            extra["stop_reason"] = "trivial"
            timing["total"] = time.perf_counter() - t0
            return SolveResult(
                support=np.full(n, k == n), status=Status.FEASIBLE, termination=Termination.COMPLETED,
                wall_time=timing["total"], iterations=0, solver=self.name, extra=extra,
            )

        XT = column_major(problem.factor_matrix())
        timing["setup"] = time.perf_counter() - t0
        evaluate = options.evaluate

        def score(mask: np.ndarray) -> float:
            te = time.perf_counter()
            value = float(evaluate(mask.copy()))
            timing["evaluate"] += time.perf_counter() - te
            return value if not math.isnan(value) else math.inf

        # ---- phase 1: the start
        t1 = time.perf_counter()
        timed_out = False
        if warm_start is not None:
            start = np.asarray(warm_start)
            if start.dtype != bool or start.shape != (n,) or int(start.sum()) != k:
                raise invalid_option("warm_start", "CBSSolver.solve()",
                                     f"a boolean mask of shape ({n},) keeping n_keep = {k} weights",
                                     f"dtype {start.dtype}, shape {start.shape}, {int(np.count_nonzero(start))} kept")
            start = start.copy()
            extra["rmp_score"] = "warm_start"
            start_loss = score(start) if evaluate is not None else None
        else:
            start, start_loss, losses, best_trial, timed_out = self._rmp(problem, XT, options, score, deadline)
            extra.update(rmp_losses=losses, rmp_best_trial=best_trial,
                         rmp_score="evaluate" if evaluate is not None else "selection_objective")
        timing["rmp"] = time.perf_counter() - t1

        # ---- phase 2: swap passes
        t2 = time.perf_counter()
        state = SelectionState(problem, start, columns=XT)
        timing["start_state"] = time.perf_counter() - t2
        objective = state.objective()
        if start_loss is None:
            start_loss = objective
        pass_losses, pass_objectives, pass_swaps = [start_loss], [objective], []
        best_loss, best_support, best_pass = start_loss, state.kept.copy(), 0
        moves: list = []
        swaps = 0
        termination = Termination.ITERATION_LIMIT
        stop_reason = "max_passes"
        if timed_out:
            termination, stop_reason = Termination.TIME_LIMIT, "time_limit"
        else:
            passes = progress(range(1, self.max_passes + 1), total=self.max_passes, desc="cbs passes",
                              enabled=options.progress)
            for pass_index in passes:
                if deadline is not None and time.perf_counter() >= deadline:
                    termination, stop_reason = Termination.TIME_LIMIT, "time_limit"
                    break
                outcome = self._pass(state, pass_index, deadline)
                swaps += outcome.swaps
                moves.extend(outcome.moves)
                if outcome.swaps == 0:
                    if outcome.timed_out:
                        termination, stop_reason = Termination.TIME_LIMIT, "time_limit"
                    else:
                        termination, stop_reason = Termination.LOCAL_OPTIMUM, "no_improving_swap"
                    break
                objective = state.objective()
                if outcome.timed_out and evaluate is not None:
                    # no model evaluation past the deadline: the partial pass is not scored
                    termination, stop_reason = Termination.TIME_LIMIT, "time_limit"
                    break
                loss = score(state.kept) if evaluate is not None else objective
                pass_losses.append(loss)
                pass_objectives.append(objective)
                pass_swaps.append(outcome.swaps)
                if loss < best_loss:
                    best_loss, best_support, best_pass = loss, state.kept.copy(), len(pass_losses) - 1
                if outcome.timed_out:
                    termination, stop_reason = Termination.TIME_LIMIT, "time_limit"
                    break
                if self._plateau(pass_losses):
                    termination, stop_reason = Termination.COMPLETED, "loss_plateau"
                    break
        timing["search"] = time.perf_counter() - t2
        timing["total"] = time.perf_counter() - t0

        extra.update(
            passes=len(pass_swaps), swaps=swaps, pass_swaps=pass_swaps, pass_losses=pass_losses,
            pass_objectives=pass_objectives, best_pass=best_pass, stop_reason=stop_reason,
        )
        if self.record_moves:
            extra["moves"] = moves
        return SolveResult(
            support=best_support, status=Status.FEASIBLE, termination=termination,
            wall_time=timing["total"], iterations=swaps, solver=self.name, extra=extra,
        )

    # --------------------------------------------------------------------------------- RMP
    def _rmp(
        self,
        problem: BlockProblem,
        XT: np.ndarray,
        options: SolveOptions,
        score: Callable[[np.ndarray], float],
        deadline: float | None,
    ) -> tuple[np.ndarray, float | None, list[float], int, bool]:
        """Best of R masks: (support, its loss or None when scored by f, all scores, best trial, timed out).

        Trial 0 is global magnitude; trial t ≥ 1 uses ``default_rng([seed, t])``. Without ``evaluate``
        masks are scored in batches by f with one product X·U (float32 when X is: enough to rank).
        """
        k = problem.n_keep
        evaluate = options.evaluate
        losses: list[float] = []
        best, best_loss, best_trial = None, math.inf, 0
        timed_out = False
        trials = progress(range(self.rmp_trials), total=self.rmp_trials, desc="cbs RMP", enabled=options.progress)
        batch: list[np.ndarray] = []

        def flush() -> None:
            nonlocal best, best_loss, best_trial
            values = _selection_objectives(problem, XT, batch)
            for mask, value in zip(batch, values):
                losses.append(value)
                if value < best_loss or best is None:
                    best, best_loss, best_trial = mask, value, len(losses) - 1
            batch.clear()

        for trial in trials:
            if trial > 0 and deadline is not None and time.perf_counter() >= deadline:
                timed_out = True
                break
            if trial == 0:
                mask = top_k_support(np.abs(problem.weights), k)
            else:
                rng = np.random.default_rng([options.seed, trial])
                mask = randomized_magnitude_support(problem.weights, k, rng)
            if evaluate is None:
                batch.append(mask)
                if len(batch) == _RMP_BATCH:
                    flush()
                continue
            value = score(mask)
            losses.append(value)
            if value < best_loss or best is None:
                best, best_loss, best_trial = mask, value, trial
        if batch:
            flush()
        return best, (best_loss if evaluate is not None else None), losses, best_trial, timed_out

    # -------------------------------------------------------------------------------- pass
    def _pass(self, state: SelectionState, pass_index: int, deadline: float | None) -> _PassOutcome:
        """One pass of Algorithm 1 (see the module docstring); mutates ``state``."""
        out = _PassOutcome()
        w, lam, g, XT = state.w, state.lam, state.g, state.columns
        eps, rho, tau = self.epsilon, self.rho, self.tau
        pruned = np.flatnonzero(~state.kept)
        kept = np.flatnonzero(state.kept)

        # order candidates with pass-start scores (stored dtype; ordering needs no more precision)
        s, _ = state.ordering_scores()
        d = state.diag
        wP, wK = w[pruned], w[kept]
        gain_p = wP * s[pruned] - 0.5 * d[pruned] * wP * wP + 0.5 * lam * wP * wP
        cost_k = wK * s[kept] + 0.5 * (d[kept] + lam) * wK * wK
        if g is not None:
            gain_p -= g[pruned] * wP
            cost_k -= g[kept] * wK
        P = pruned[np.argsort(-gain_p, kind="stable")]
        p0 = int(P[0])
        # F_{q p0} for the kept q: gather the kept columns when they are few, else one full product
        if kept.size < XT.shape[0] // 4:
            F_p0 = (XT[kept] @ XT[p0]).astype(np.float64)
        else:
            F_p0 = (XT @ XT[p0]).astype(np.float64)[kept]
        K = kept[np.argsort(cost_k - wK * w[p0] * F_p0, kind="stable")]
        nK = K.size

        # ring buffer of float64 kept columns: rank j lives in slot j mod 2ρ
        m = min(2 * rho, nK)
        ring = np.zeros((m, XT.shape[1]))
        ring_rank = np.full(m, -1, dtype=np.int64)
        ring_d = np.zeros(m)
        used = np.zeros(nK, dtype=bool)
        rhs = np.empty((2, XT.shape[1]))

        for i in range(P.size):
            if i > 0 and out.failures > tau:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                out.timed_out = True
                break
            lo, hi = (0, 1) if i == 0 else (max(1, i - rho), min(nK, i + rho))
            ranks = np.arange(lo, hi)
            ranks = ranks[~used[lo:hi]] if hi > lo else ranks
            if ranks.size == 0:
                out.failures += 1
                continue
            out.visited += 1
            slots = ranks % m
            for j, slot in zip(ranks, slots):
                if ring_rank[slot] != j:
                    ring[slot] = XT[K[j]]
                    ring_rank[slot] = j
                    ring_d[slot] = ring[slot] @ ring[slot]
            p = int(P[i])
            rhs[0] = state.r
            rhs[1] = XT[p]
            xp = rhs[1]
            prod = ring @ rhs.T  # (m, 2): s_q and F_pq for every slot, float64
            wp = w[p]
            a = wp * float(xp @ state.r) - 0.5 * float(xp @ xp) * wp * wp + 0.5 * lam * wp * wp
            qs = K[ranks]
            wq = w[qs]
            b = wq * prod[slots, 0] + 0.5 * (ring_d[slots] + lam) * wq * wq
            if g is not None:
                a -= g[p] * wp
                b -= g[qs] * wq
            gain = a - b + wp * wq * prod[slots, 1]
            ok = np.flatnonzero((gain > 0) & (2.0 * gain >= eps))
            if ok.size == 0:
                if i == 0:
                    return out  # the most promising pair does not improve: stop (official rule)
                out.failures += 1
                continue
            t = int(ok[0])
            q, slot = int(qs[t]), int(slots[t])
            state.swap(p, q, xp=xp, xq=ring[slot])
            used[ranks[t]] = True
            out.swaps += 1
            if self.record_moves:
                out.moves.append([pass_index, p, q, float(gain[t])])
        return out

    def _plateau(self, losses: list[float]) -> bool:
        """The official stop: the last score is worse than the best before it, found ≥ patience passes ago."""
        if self.patience is None or len(losses) < 3:
            return False
        previous = np.asarray(losses[:-1])
        best = int(np.argmin(previous))
        return losses[-1] > previous[best] and len(losses) - 1 - best >= self.patience


# ------------------------------------------------------------------------------ small helpers
def _int_at_least(value: Any, low: int, argument: str, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise invalid_option(argument, where, f"an integer >= {low}", repr(value))
    return int(value)
