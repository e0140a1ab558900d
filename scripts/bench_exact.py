"""Benchmark the exact solvers: time to a proven optimum against the block size n.

    python scripts/bench_exact.py --solvers bnb highs --sizes 10 15 20 25 30 35 40 50 60 70 80 \
        --seeds 3 --time-limit 60 --out results/bench_exact
    python scripts/bench_exact.py --regime N=n --solvers bnb gurobi --sizes 30 40 50 60 80 --out results/bench_exact_Nn
    python scripts/bench_exact.py --blocks results/blocks_fc1 --solvers bnb --out results/bench_exact_fc1

Instances: k = n/2, N = 2n (``--regime N=2n``, the default) or N = n (``--regime N=n``: F = XᵀX is square
and nearly singular, λ_min(H) ≈ λ, the harder regime), X Gaussian/√N, w Gaussian, λ = 1e-2, g = 0, one
per (n, seed). Each solver runs on growing n until, at some n, no seed is proven within the time limit
(``--keep-going`` runs every size). Writes ``OUT/records.jsonl`` (one line per run: solver, n, seed,
proven, time, gap, objective, bound, iterations, the environment; appended as runs end, and runs already
recorded are skipped, so an interrupted benchmark resumes) and ``OUT/time_vs_n.png``, and prints where.
Solver names: bnb, highs, cvxpy (SCIP), pyomo (SCIP), gurobi (Pyomo + Gurobi on one thread, dense MIQP, if
the ``gurobi`` extra is installed; its pip licence refuses quadratic models of more than 200 variables, so
n ≤ 100 here).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from engine.options import SolveOptions
from engine.records import append_jsonl, atomic_write_bytes, environment, write_json_atomic
from engine.result import Status
from engine.solve import UnprovenOptimalityWarning, solve_block
from formulations.problem import BlockProblem

#: CLI name -> (registry name or factory, constructor parameters)
SOLVERS = {
    "bnb": ("engine.solvers.branch_and_bound", "BranchAndBoundSolver", {}),
    "highs": ("engine.solvers.highs", "HighsSolver", {}),
    "cvxpy": ("engine.solvers.cvxpy_backend", "CvxpySolver", {"solver": "SCIP"}),
    "pyomo": ("engine.solvers.pyomo_backend", "PyomoSolver", {"solver_name": "scip"}),
    # Pyomo's dense MIQP (2n variables) on one thread: Gurobi's pip licence refuses quadratic models above 200
    # variables, and cvxpy hands Gurobi 3n of them (it factors the quadratic form) from n = 67 on
    "gurobi": ("engine.solvers.pyomo_backend", "PyomoSolver", {"solver_name": "gurobi", "threads": 1,
                                                              "low_rank": False}),
}


REGIMES = {"N=2n": 2, "N=n": 1}


def instance(n: int, seed: int, damping: float = 1e-2, regime: str = "N=2n") -> BlockProblem:
    """k = n/2, N = 2n or n (``regime``), X ~ N(0, 1)/√N, w ~ N(0, 1) (seeded by (n, seed); the N = 2n
    instances are those of earlier runs)."""
    rng = np.random.default_rng([n, seed])
    N = REGIMES[regime] * n
    X = rng.standard_normal((N, n)) / math.sqrt(N)
    return BlockProblem(rng.standard_normal(n), n // 2, damping, factor=X, label=f"gauss-n{n}-s{seed}")


def _make(name: str):
    import importlib

    module, cls, params = SOLVERS[name]
    return getattr(importlib.import_module(module), cls)(**params)


def _done(path: Path) -> set[tuple]:
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add((r["solver"], r.get("regime", "N=2n"), r["n"], r["seed"], r["time_limit"]))
    return done


def _table(records: list[dict]) -> str:
    """Seconds per seed, one column per solver (**>T**: not proven within the limit, with the gap left)."""
    solvers = sorted({r["solver"] for r in records})
    lines = ["| n | " + " | ".join(f"`{s}`" for s in solvers) + " |", "|---:|" + "---|" * len(solvers)]
    for n in sorted({r["n"] for r in records}):
        cells = []
        for s in solvers:
            rows = sorted((r for r in records if r["solver"] == s and r["n"] == n), key=lambda r: r["seed"])
            if not rows:
                cells.append("–")
                continue

            def one(r: dict) -> str:
                if r["proven"]:
                    return f"{r['time']:.2f}"
                if r["termination"] == "error":
                    return "error"
                return f"**>{r['time_limit']:g}** ({100 * r['gap']:.0f} %)" if r["gap"] is not None else "**>T**"
            cells.append(", ".join(one(r) for r in rows))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], path: Path, time_limit: float, regime: str = "N=2n") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for solver in dict.fromkeys(r["solver"] for r in records):
        rows = [r for r in records if r["solver"] == solver]
        ns = sorted({r["n"] for r in rows})
        med = [float(np.median([r["time"] for r in rows if r["n"] == n])) for n in ns]
        line, = ax.plot(ns, med, marker="o", label=f"{solver} (median)")
        proven = [r for r in rows if r["proven"]]
        failed = [r for r in rows if not r["proven"]]
        ax.scatter([r["n"] for r in proven], [r["time"] for r in proven], s=10, color=line.get_color(), alpha=0.5)
        ax.scatter([r["n"] for r in failed], [r["time"] for r in failed], s=30, marker="x", color=line.get_color())
    ax.axhline(time_limit, color="grey", ls="--", lw=0.8, label="time limit")
    ax.set_yscale("log")
    ax.set_xlabel(f"block size n (k = n/2, {regime.replace('N=', 'N = ')}, λ = 1e-2)")
    ax.set_ylabel("seconds to proven optimum (x: not proven)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _real_blocks(args: argparse.Namespace) -> int:
    """Each solver on every problem of ``args.blocks`` (resumable like the Gaussian runs)."""
    from engine.problem_io import load_problem

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "blocks.jsonl"
    done = set()
    if path.exists():
        done = {(r["solver"], r["block"]) for r in map(json.loads, path.read_text().splitlines()) if r}
    files = sorted(args.blocks.glob("*.npz"))
    env = environment()
    for solver_name in args.solvers:
        solver = _make(solver_name)
        for f in files:
            if (solver_name, str(f)) in done:
                continue
            problem = load_problem(f)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnprovenOptimalityWarning)
                res = solve_block(problem, solver, SolveOptions(time_limit=args.time_limit))
            append_jsonl(path, {"solver": solver_name, "block": str(f), "n": problem.n, "k": problem.n_keep,
                                "N": problem.n_samples, "proven": res.status == Status.OPTIMAL,
                                "time": res.wall_time, "gap": res.gap, "nodes": res.iterations,
                                "time_limit": args.time_limit, "environment": env})
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for solver_name in args.solvers:
        rows = [r for r in records if r["solver"] == solver_name and r["block"] in {str(f) for f in files}]
        times = [r["time"] for r in rows if r["proven"]]
        gaps = [r["gap"] for r in rows if not r["proven"] and r["gap"] is not None]
        print(f"{solver_name}: proved {len(times)} of {len(rows)} blocks of {args.blocks} in {args.time_limit:g} s"
              + (f"; median {np.median(times):.3g} s, max {max(times):.3g} s" if times else "")
              + (f"; open gaps {100 * min(gaps):.3g}-{100 * max(gaps):.3g} %" if gaps else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", nargs="+", default=["bnb", "highs"], choices=sorted(SOLVERS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[10, 15, 20, 25, 30, 35, 40, 50, 60, 70, 80])
    ap.add_argument("--max-size", type=int, default=None, help="skip sizes above this (e.g. 30 for SCIP)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="N=2n", help="gradient rows N per weight")
    ap.add_argument("--keep-going", action="store_true", help="run every size even after one fails on all seeds")
    ap.add_argument("--out", type=Path, default=Path("results/bench_exact"))
    ap.add_argument("--blocks", type=Path, default=None, metavar="DIR",
                    help="instead of Gaussian instances: every .npz problem in DIR (e.g. from cbs export-blocks), "
                         "with the k it holds; writes OUT/blocks.jsonl and prints how many each solver proved")
    args = ap.parse_args(argv)
    if args.blocks is not None:
        return _real_blocks(args)

    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "records.jsonl"
    done = _done(records_path)
    env = environment()
    env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for solver_name in args.solvers:
        solver = _make(solver_name)
        if not solver.available():
            print(f"skipping {solver_name}: {', '.join(solver.capabilities.missing_modules())} not installed")
            continue
        for n in sorted(args.sizes):
            if args.max_size is not None and n > args.max_size:
                break
            proven_any = False
            for seed in range(args.seeds):
                if (solver_name, args.regime, n, seed, args.time_limit) in done:
                    proven_any = True  # resumed: do not stop on sizes already done
                    continue
                problem = instance(n, seed, args.damping, args.regime)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UnprovenOptimalityWarning)
                    res = solve_block(problem, solver, SolveOptions(time_limit=args.time_limit))
                elapsed = time.perf_counter() - t0
                proven = res.status == Status.OPTIMAL
                proven_any |= proven
                rec = {
                    "solver": solver_name, "regime": args.regime, "n": n, "k": problem.n_keep,
                    "N": problem.n_samples, "damping": args.damping,
                    "seed": seed, "time_limit": args.time_limit, "proven": proven, "time": elapsed,
                    "gap": res.gap, "objective": res.objective, "bound": res.bound,
                    "termination": res.termination.value, "iterations": res.iterations,
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "extra": {k: v for k, v in res.extra.items() if isinstance(v, (int, float, str, type(None)))},
                    "environment": env,
                }
                append_jsonl(records_path, rec)
                print(f"{solver_name:7s} n={n:3d} seed={seed} {'proven' if proven else 'NOT proven':10s} "
                      f"{elapsed:7.2f}s gap={res.gap if res.gap is not None else float('nan'):.2e}", flush=True)
            if not proven_any and not args.keep_going:
                break
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["time_limit"] == args.time_limit and r.get("regime", "N=2n") == args.regime]
    _plot(records, args.out / "time_vs_n.png", args.time_limit, args.regime)
    summary = {}
    for solver_name in dict.fromkeys(r["solver"] for r in records):
        ok = [r["n"] for r in records if r["solver"] == solver_name and r["proven"]]
        all_ok = [n for n in sorted({r["n"] for r in records if r["solver"] == solver_name})
                  if all(r["proven"] for r in records if r["solver"] == solver_name and r["n"] == n)]
        summary[solver_name] = {"largest_n_any_seed": max(ok) if ok else None,
                                "largest_n_all_seeds": max(all_ok) if all_ok else None}
    write_json_atomic(args.out / "summary.json", summary)
    (args.out / "table.md").write_text(_table(records))
    print(json.dumps(summary))
    print(f"wrote {records_path}, {args.out / 'time_vs_n.png'} and {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
