"""Time one CBS-S solve (RMP + swap passes) on a random block of MLPNet's size.

The factor is X = G/√N with G (N, n) = Z V + E: a rank-``rank`` part (Z (N, r), V (r, n) standard
normal, scaled by ``--shared``) plus iid noise, so columns are correlated as per-sample gradients are.
Weights are w ~ N(0, ``--weight-scale``²). Prints the phases and appends a JSONL record.

    python scripts/bench_local_search.py                      # n = 32,360, N = 10,000, float32, k = 10 %
    python scripts/bench_local_search.py --n 2000 --N 500 --max-passes 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from engine.options import SolveOptions
from engine.records import append_jsonl, environment
from engine.solvers.base import top_k_support
from engine.solvers.local_search import CBSSolver
from formulations.problem import BlockProblem


def build_problem(n: int, N: int, keep: float, rank: int, shared: float, weight_scale: float, damping: float,
                  dtype: str, order: str, seed: int) -> BlockProblem:
    """The random block described in the module docstring, X stored in ``order`` ("C" or "F")."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((N, n), dtype=np.float32)
    if rank > 0:
        Z = rng.standard_normal((N, rank), dtype=np.float32)
        V = rng.standard_normal((rank, n), dtype=np.float32)
        G += (shared / np.sqrt(rank)) * (Z @ V)
    G *= np.float32(1.0 / np.sqrt(N))
    X = G.astype(dtype, copy=False)
    if order == "F":
        X = np.asfortranarray(X)
    w = weight_scale * rng.standard_normal(n)
    return BlockProblem(w, max(1, int(round(keep * n))), damping, factor=X, label=f"bench n={n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32360, help="weights in the block (MLPNet: 32,360)")
    parser.add_argument("--N", type=int, default=10000, help="gradient rows (MLPNet setting: 10,000)")
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of weights kept (k = keep·n)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the shared gradient component")
    parser.add_argument("--shared", type=float, default=2.0, help="scale of the shared component")
    parser.add_argument("--weight-scale", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--order", choices=["C", "F"], default="C", help="memory order of X (the engine gives C)")
    parser.add_argument("--rmp-trials", type=int, default=50)
    parser.add_argument("--max-passes", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=1e-4)
    parser.add_argument("--rho", type=int, default=10)
    parser.add_argument("--tau", type=int, default=20)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench_local_search.jsonl"))
    args = parser.parse_args(argv)

    t = time.perf_counter()
    problem = build_problem(args.n, args.N, args.keep, args.rank, args.shared, args.weight_scale, args.damping,
                            args.dtype, args.order, args.seed)
    build = time.perf_counter() - t
    print(f"problem: n={problem.n} N={problem.n_samples} k={problem.n_keep} X {problem.factor.dtype} "
          f"order={args.order} ({problem.factor.nbytes / 2**30:.2f} GiB), built in {build:.1f} s")

    solver = CBSSolver(rmp_trials=args.rmp_trials, epsilon=args.epsilon, rho=args.rho, tau=args.tau,
                       max_passes=args.max_passes)
    result = solver.solve(problem, SolveOptions(seed=args.seed, time_limit=args.time_limit))
    extra = result.extra
    timing = extra["timing"]
    print(f"phases [s]: setup (Xᵀ) {timing['setup']:.2f} | RMP ({len(extra['rmp_losses'])} masks) "
          f"{timing['rmp']:.2f} | search {timing['search']:.2f} (start state {timing['start_state']:.2f}) | "
          f"total {timing['total']:.2f}")
    print(f"RMP: best trial {extra['rmp_best_trial']}, f(magnitude) = {extra['rmp_losses'][0]:.6g}, "
          f"best f = {min(extra['rmp_losses']):.6g}")
    passes, swaps = extra["passes"], extra["swaps"]
    per_pass = ((timing["search"] - timing["start_state"]) / passes) if passes else float("nan")
    print(f"search: {passes} passes, {swaps} swaps ({per_pass:.3f} s/pass), "
          f"stop: {extra['stop_reason']} ({result.termination.value})")
    objectives = extra["pass_objectives"]
    print(f"selection objective: start {objectives[0]:.6g} -> best {objectives[extra['best_pass']]:.6g} "
          f"(pass {extra['best_pass']}); swaps per pass (first 10): {extra['pass_swaps'][:10]}")
    magnitude = top_k_support(np.abs(problem.weights), problem.n_keep)
    changed = int((result.support != magnitude).sum() // 2)
    print(f"support differs from magnitude in {changed} of {problem.n_keep} kept weights")

    record = {
        "script": "bench_local_search", "args": {k: str(v) for k, v in vars(args).items()},
        "build_s": build, "result": result.summary(),
        "extra": {k: v for k, v in extra.items() if k not in ("moves",)},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
