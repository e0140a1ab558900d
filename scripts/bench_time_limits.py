"""Measure how far the exact backends run past a time limit (issue item 16).

    python scripts/bench_time_limits.py --solvers bnb highs pyomo cvxpy --n 60 --time-limit 0.5 --seeds 3 \
        --out results/bench_time_limits

Instances: the hard benchmark regime of ``scripts/bench_exact.py`` (k = n/2, N = 2n, X Gaussian/√N,
w Gaussian, λ = 1e-2), seeded by (n, seed); none is proven within 0.5 s at n = 60. Each solver's
``solve`` is called directly (no engine check around it) and timed by the wall clock:
overshoot = elapsed − time_limit. Each solver first solves one untimed n = 10 block, so that the first
timed run does not carry the one-off imports of its backend (``--no-warmup`` to time them too).
Writes ``OUT/overshoot.json`` (one record per run, and per solver the largest and mean overshoot) and
prints the table and where it wrote it. Not a test: timings depend on the machine and its load (the
records carry the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from engine.options import SolveOptions
from engine.records import environment, write_json_atomic

SOLVERS = ("bnb", "highs", "pyomo", "cvxpy")


def main(argv: list[str] | None = None) -> int:
    """Run every (solver, seed) once at the time limit; write and print the overshoots."""
    import bench_exact  # the sibling script (its folder is on sys.path when run as a script): same instances

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=0.5)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first call's imports too")
    ap.add_argument("--out", type=Path, default=Path("results/bench_time_limits"))
    args = ap.parse_args(argv)

    runs, summary = [], {}
    for name in args.solvers:
        solver = bench_exact._make(name)
        if not solver.available():
            print(f"skipping {name}: {', '.join(solver.capabilities.missing_modules())} not installed")
            continue
        if args.warmup:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                solver.solve(bench_exact.instance(10, 0), SolveOptions(time_limit=args.time_limit))
        overs = []
        for seed in range(args.seeds):
            problem = bench_exact.instance(args.n, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                res = solver.solve(problem, SolveOptions(time_limit=args.time_limit))
                elapsed = time.perf_counter() - t0
            over = elapsed - args.time_limit
            overs.append(over)
            runs.append({"solver": name, "n": args.n, "k": problem.n_keep, "seed": seed,
                         "time_limit": args.time_limit, "elapsed": elapsed, "overshoot": over,
                         "termination": res.termination.value, "status": res.status.value,
                         "reported_wall_time": res.wall_time})
            print(f"{name:6s} n={args.n} seed={seed} elapsed {elapsed:6.3f} s  overshoot {over:+6.3f} s  "
                  f"{res.termination.value}", flush=True)
        summary[name] = {"max_overshoot": max(overs), "mean_overshoot": sum(overs) / len(overs)}
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    path = args.out / "overshoot.json"
    write_json_atomic(path, {"summary": summary, "runs": runs, "warmup": args.warmup, "environment": env})
    print(json.dumps(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
