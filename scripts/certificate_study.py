"""How close is each heuristic's certified gap to its true gap? (the certificate of engine.certificate)

For every block (a `cbs solve` .npz problem, e.g. from `cbs export-blocks` or `scripts/layerwise_exact.py
--export`) and sparsity: the optimum by `bnb` (warm-started at the best heuristic answer, a time limit per
block; only blocks it proves count), every heuristic's answer, and the certificate of that answer under
each budget:

* ``old``: the dual bound at the answer's own residual (the certificate before issue 22);
* ``0``: that bound and the trivial one (0 when g = 0);
* ``auto``: the default (5 % of the heuristic's solve time, at least a few relaxation iterations);
* a number T: T seconds (relaxation, then branch and bound).

true gap = (E − E*)/E and certified gap = (E − LB)/E (the unit `cbs` reports), so certified − true =
(E* − LB)/E ≥ 0.

    python scripts/certificate_study.py --blocks results/certificate_blocks/* --out results/certificate_study \
        [--executor processes --workers 2]

Writes ``OUT/records.jsonl`` (one line per block, sparsity and method; runs already recorded are skipped,
so an interrupted study resumes), ``OUT/summary.md`` and ``OUT/certified_minus_true.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.certificate import tighten_bound  # noqa: E402
from engine.cli import POSITIVE, SPARSITY, number_type  # noqa: E402
from engine.options import SolveOptions  # noqa: E402
from engine.problem_io import load_problem  # noqa: E402
from engine.records import append_jsonl, atomic_write_bytes, environment, read_jsonl  # noqa: E402
from engine.result import Status  # noqa: E402
from engine.executor import EXECUTORS, make_executor  # noqa: E402
from engine.solve import solve_block  # noqa: E402
from engine.solvers.registry import get_solver  # noqa: E402
from formulations.objective import dual_bound, optimal_update, relative_gap  # noqa: E402

METHODS = ["magnitude", "woodfisher", "greedy", "cbs", "iht", "swap", "admm"]
PATTERN_METHODS = ["magnitude", "woodfisher", "wanda", "iht", "swap", "admm"]
BUDGET = number_type(float, 0.0, what="a number >= 0")


def _budget(text: str):
    return text if text in ("old", "auto") else BUDGET(text)


def _answers(path: Path, sparsity: float | None, args, done: set):
    """(problem, methods still to record, {method: (support, E, seconds)}) of one block at one sparsity, or
    None when every method is recorded already."""
    base = load_problem(path)
    problem = base if sparsity is None else base.with_n_keep(max(1, int(round((1 - sparsity) * base.n))))
    methods = PATTERN_METHODS if problem.pattern is not None else args.methods
    if all((str(path), sparsity, m) in done for m in methods):
        return None
    answers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in methods:
            t0 = time.perf_counter()
            r = solve_block(problem, m, SolveOptions(certify_time=0, seed=0))
            answers[m] = (r.support, r.objective, time.perf_counter() - t0)
    return problem, answers


def _run_blocks(items: list, args, done: set, out_path: Path, env: dict) -> None:
    """Every (path, sparsity) of ``items``: the heuristics here, the reference bnb of all of them at once on
    ``--executor`` (warm-started at each block's best heuristic answer), then the certificates here (their
    budgets are seconds of this process) and one record per method."""
    pending = [(path, s, got) for path, s in items if (got := _answers(path, s, args, done)) is not None]
    if not pending:
        return
    problems = [got[0] for _, _, got in pending]
    warm = [min(got[1].values(), key=lambda a: a[1])[0] for _, _, got in pending]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = args.pool.solve(get_solver("bnb"), problems,
                               [SolveOptions(time_limit=args.reference_time_limit)] * len(problems),
                               "reference bnb", warm_starts=warm)
    for (path, sparsity, (problem, answers)), ref in zip(pending, refs):
        _record(path, sparsity, problem, answers, ref, args, done, out_path, env)


def _record(path, sparsity, problem, answers, ref, args, done, out_path, env) -> None:
    source = path.parent.name
    proven = ref.status == Status.OPTIMAL
    for m, (S, E, seconds) in answers.items():
        if (str(path), sparsity, m) in done:
            continue
        sol = optimal_update(problem, S)
        old = dual_bound(problem, alpha=sol.residual)
        rec = {"block": str(path), "source": source, "n": problem.n, "k": problem.n_keep, "N": problem.n_samples,
               "pattern": None if problem.pattern is None else "{}:{}".format(*problem.pattern),
               "sparsity": sparsity, "method": m, "objective": E, "solve_seconds": seconds,
               "optimum": ref.objective, "optimum_bound": ref.bound, "proven": proven,
               "true_gap": (E - ref.objective) / max(abs(E), 1e-300),
               "excess": (E - ref.objective) / max(abs(ref.objective), 1e-300),
               "certified": {"old": relative_gap(E, old)}, "seconds": {"old": 0.0}, "from": {"old": "residual"}}
        for b in args.budgets:
            if b == "old":
                continue
            cert = tighten_bound(problem, S, E, sol.residual, sol.weights, None if b == "auto" else b, seconds)
            rec["certified"][str(b)] = relative_gap(E, cert.bound)
            rec["seconds"][str(b)] = cert.seconds
            rec["from"][str(b)] = cert.source
        rec["environment"] = env
        append_jsonl(out_path, rec)
        done.add((str(path), sparsity, m))


def _recertify(records: list[dict], budgets: list, out_path: Path) -> None:
    """Each record's answer again (the same solver and seed) and its certificate under ``budgets``; only on
    blocks whose optimum was proven (the others are not summarised)."""
    from engine.records import atomic_write_bytes as write

    cache: dict[tuple, object] = {}
    for i, rec in enumerate(records):
        if not rec["proven"]:
            continue
        key = (rec["block"], rec["sparsity"])
        if key not in cache:
            base = load_problem(Path(rec["block"]))
            cache.clear()
            cache[key] = base if rec["sparsity"] is None else base.with_n_keep(rec["k"])
        problem = cache[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            r = solve_block(problem, rec["method"], SolveOptions(certify_time=0, seed=0))
            seconds = time.perf_counter() - t0
        sol = optimal_update(problem, r.support)
        for b in budgets:
            cert = tighten_bound(problem, r.support, sol.objective, sol.residual, sol.weights,
                                 None if b == "auto" else b, seconds)
            rec["certified"][str(b)] = relative_gap(sol.objective, cert.bound)
            rec["seconds"][str(b)] = cert.seconds
            rec["from"][str(b)] = cert.source
        if abs(sol.objective - rec["objective"]) > 1e-9 * max(1.0, abs(rec["objective"])):
            print(f"{rec['block']} {rec['method']}: the answer changed ({rec['objective']} -> {sol.objective})",
                  file=sys.stderr)
        if (i + 1) % 50 == 0:
            print(f"recertified {i + 1}/{len(records)}", file=sys.stderr, flush=True)
    write(out_path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _name_sources(records: list[dict]) -> None:
    """Each record's ``source``: its block's folder relative to the folders' common parent (e.g.
    ``layerwise_mlpnet/fc2_2-4``)."""
    parents = {str(Path(r["block"]).parent) for r in records}
    common = os.path.commonpath(list(parents)) if len(parents) > 1 else str(Path(next(iter(parents))).parent)
    for r in records:
        r["source"] = os.path.relpath(str(Path(r["block"]).parent), common)


def summarize(records: list[dict], budgets: list[str]) -> str:
    _name_sources(records)
    recs = [r for r in records if r["proven"]]
    lines = [f"{len(recs)} answers on blocks whose optimum bnb proved ({len(records) - len(recs)} more on blocks it "
             "did not prove are left out). certified − true = (E* − LB)/E, in points of gap.", "",
             "Share of answers whose certified gap is within 2 points of the true gap, by budget (in brackets: the "
             "largest gap reported for an answer within 1 % of the optimum):", "",
             "| blocks | answers | " + " | ".join(budgets) + " |", "|---|---:|" + "---:|" * len(budgets)]
    for source in sorted({r["source"] for r in recs}):
        for s in sorted({r["sparsity"] for r in recs if r["source"] == source}, key=lambda x: (x is None, x)):
            rows = [r for r in recs if r["source"] == source and r["sparsity"] == s]
            cells = []
            for b in budgets:
                d = np.array([r["certified"][b] - r["true_gap"] for r in rows])
                near = [r["certified"][b] for r in rows if r["excess"] <= 0.01]
                cells.append(f"{100 * np.mean(d <= 0.02):.0f} % ({'–' if not near else f'{100 * max(near):.3g} %'})")
            what = rows[0]["pattern"] if s is None else f"s = {s}"
            lines.append(f"| {source}, {what} (n = {rows[0]['n']}) | {len(rows)} | " + " | ".join(cells) + " |")
    lines.append("")
    for source in sorted({r["source"] for r in recs}):
        rows = [r for r in recs if r["source"] == source]
        blocks = len({r["block"] for r in rows})
        first = rows[0]
        lines += [f"**{source}** ({blocks} blocks, n = {sorted({r['n'] for r in rows})}, N = {first['N']}"
                  + (f", {first['pattern']}" if first["pattern"] else
                     f", sparsities {sorted({r['sparsity'] for r in rows})}") + ")", "",
                  "| method | budget | within 2 points | median | 90th pct | max | max gap reported, answers within 1 % "
                  "of E* | mean seconds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for m in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == m]
            for b in budgets:
                d = np.array([r["certified"][b] - r["true_gap"] for r in mine if r["certified"].get(b) is not None])
                if d.size == 0:
                    continue
                near = [r["certified"][b] for r in mine if r["excess"] <= 0.01 and r["certified"].get(b) is not None]
                secs = np.mean([r["seconds"][b] for r in mine])
                lines.append(f"| {m} | {b} | {100 * np.mean(d <= 0.02):.0f} % | {100 * np.median(d):.2f} | "
                             f"{100 * np.quantile(d, 0.9):.2f} | {100 * d.max():.4g} | "
                             f"{'–' if not near else f'{100 * max(near):.4g} %'} | {secs:.3f} |")
        lines.append("")
    lines += ["Per method, every block together: certified − true in points (median / 90th percentile / max), and the "
              "share within 2 points:", "", "| method | answers | " + " | ".join(budgets) + " |",
              "|---|---:|" + "---|" * len(budgets)]
    for m in dict.fromkeys(r["method"] for r in recs):
        mine = [r for r in recs if r["method"] == m]
        cells = []
        for b in budgets:
            d = 100 * np.array([r["certified"][b] - r["true_gap"] for r in mine])
            cells.append(f"{np.median(d):.3g} / {np.quantile(d, 0.9):.3g} / {d.max():.3g} ({np.mean(d <= 2):.0%})")
        lines.append(f"| {m} | {len(mine)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Overall, every method and block together:")
    lines += ["", "| budget | answers | within 2 points | median | 90th pct | max gap reported within 1 % of E* |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in budgets:
        d = np.array([r["certified"][b] - r["true_gap"] for r in recs if r["certified"].get(b) is not None])
        near = [r["certified"][b] for r in recs if r["excess"] <= 0.01 and r["certified"].get(b) is not None]
        if d.size:
            lines.append(f"| {b} | {d.size} | {100 * np.mean(d <= 0.02):.1f} % | {100 * np.median(d):.2f} | "
                         f"{100 * np.quantile(d, 0.9):.2f} | {100 * max(near):.4g} % |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], budgets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["proven"]]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.2 * len(budgets), 3.6), sharey=True)
    for ax, b in zip(np.atleast_1d(axes), budgets):
        for m in methods:
            d = np.sort([max(r["certified"][b] - r["true_gap"], 1e-6) for r in recs
                         if r["method"] == m and r["certified"].get(b) is not None])
            if d.size:
                ax.step(100 * d, np.arange(1, d.size + 1) / d.size, where="post", label=m)
        ax.axvline(2.0, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"budget: {b}", fontsize=9)
        ax.set_xlabel("certified − true gap (points)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("share of answers")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", nargs="+", type=Path, required=True, help="folders of .npz problems")
    ap.add_argument("--max-blocks", type=number_type(int, 1, what="an integer >= 1"), default=None,
                    help="evenly spaced blocks per folder (default: all)")
    ap.add_argument("--sparsities", nargs="+", type=SPARSITY, default=[0.5, 0.7, 0.9],
                    help="unstructured blocks (an N:M block keeps its pattern's k)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--budgets", nargs="+", type=_budget, default=["old", 0.0, "auto", 0.1, 1.0])
    ap.add_argument("--reference-time-limit", type=POSITIVE, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "certificate_study")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--recertify", nargs="+", type=_budget, default=None, metavar="BUDGET",
                    help="recompute these budgets' certificates of the recorded answers (after a change to the "
                         "certificate), keeping the optimum and the other budgets; rewrites OUT/records.jsonl")
    ap.add_argument("--executor", choices=EXECUTORS, default=None,
                    help="where the reference bnb solves run (default: processes with --workers > 1, else here)")
    ap.add_argument("--workers", type=number_type(int, 1, what="an integer >= 1"), default=1)
    ap.add_argument("--ray-address", default=None, help="the Ray cluster to join with --executor ray")
    ap.add_argument("--batch", type=number_type(int, 1, what="an integer >= 1"), default=32,
                    help="blocks x sparsities whose references are solved together")
    args = ap.parse_args(argv)
    args.pool = make_executor(args.executor, args.workers, args.ray_address, "certificate_study.py")
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "records.jsonl"
    records = read_jsonl(out_path) if out_path.exists() else []
    done = {(r["block"], r["sparsity"], r["method"]) for r in records}
    env = environment()
    if args.recertify:
        _recertify(records, args.recertify, out_path)
    elif not args.summary_only:
        for folder in args.blocks:
            files = sorted(folder.glob("*.npz"))
            if args.max_blocks is not None and len(files) > args.max_blocks:
                files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, args.max_blocks).round().astype(int))]
            items = [(path, s) for path in files
                     for s in ([None] if load_problem(path).pattern is not None else args.sparsities)]
            for start in range(0, len(items), args.batch):  # records are appended batch by batch (resumable)
                _run_blocks(items[start : start + args.batch], args, done, out_path, env)
                print(f"{folder.name}: {min(start + args.batch, len(items))}/{len(items)} blocks x sparsities",
                      file=sys.stderr, flush=True)
        records = read_jsonl(out_path)
    budgets = [str(b) for b in args.budgets]
    text = summarize(records, budgets)
    (args.out / "summary.md").write_text(text)
    plot(records, budgets, args.out / "certified_minus_true.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
