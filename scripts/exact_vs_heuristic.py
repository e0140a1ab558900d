"""How far is each heuristic from the proven optimum? Heuristics and exact solvers on real and random blocks.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
    python scripts/exact_vs_heuristic.py --data-dir ../shared/data --out results/exact_vs_heuristic

**Instances.** (1) Real blocks of the WoodFisher MLPNet checkpoint (784-40-20-10): every row of fc3
(n = 20) and of fc2 (n = 40), and ``--fc1-chunks`` chunks of fc1 for each size in ``--fc1-sizes``
(default 20 40 60 80 100); X = G/√N from N = ``--fisher-samples`` per-sample gradients (default 1000 MNIST
training samples drawn with ``--seed``; ``engine.fisher.per_sample_gradients``, blocks from
``engine.blocks.make_blocks``, as in ``cbs export-blocks``), absolute damping λ = ``--damping`` (1e-3,
the pruner's default; ``--relative-damping``: λ = damping·mean(diag F) per block), g = 0. fc1 chunks are
taken evenly spaced among the chunks of highest numerical rank (an input pixel constant over the samples,
the image border, gives X_ij = δ_i·x_j parallel to its neighbours: such chunks are nearly trivial).
(2) Seeded random instances (``--random-sizes``, ``--random-seeds``): "well" (N = 4n Gaussian
rows /√N, λ = 0.1) and "ill" (N = n/2, columns from n/3 shared directions plus 5 % noise, λ = 1e-4).
Every instance is solved at every sparsity in ``--sparsities`` (k = round((1 − s)·n), at least 1).

**Solvers.** Every heuristic of ``--heuristics`` (default: magnitude woodfisher greedy cbs iht and every
other available non-exact registered solver, discovered with ``engine.solvers.registry.solver_info()``),
the reference exact solver ``bnb`` (time limit ``--reference-time-limit``, default 60 s) and the other
exact solvers of ``--exact`` (default highs pyomo cvxpy; time limit ``--time-limit``, default 10 s, on
blocks of at most ``--exact-max-n`` weights, default 20). All answers go through
``engine.solve.solve_block`` (re-scored, certified by the dual bound at their own residual).

**Outputs** (under ``--out``): ``records.jsonl`` (one line per (instance, sparsity, solver): block,
source, n, k, N, sparsity, solver, objective, bound (certified), gap (certified), reference objective,
whether it is proven, gap to the optimum (E − E_opt)/E_opt, status, termination, time; appended as
runs end; runs already recorded are skipped, so an interrupted study resumes), ``summary.md`` (per
source and heuristic: share of instances where it is optimal, mean and max relative gap to the optimum,
mean time; per exact solver: share proven, times), ``gap_vs_n.png``, ``time_vs_n.png``,
``blocks/*.npz`` (the real blocks with k for the first sparsity, replayable with ``cbs solve``). Prints where it wrote them.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cli import NONNEG_INT, POSITIVE, POSITIVE_INT, number_type
from engine.errors import InvalidOptionError
from engine.options import SolveOptions
from engine.progress import progress
from engine.records import append_jsonl, atomic_write_bytes, environment, write_json_atomic
from engine.result import Status
from engine.solve import UnprovenOptimalityWarning, solve_block
from engine.solvers.registry import get_solver, solver_info
from formulations.objective import IllConditionedWarning
from formulations.problem import BlockProblem

DEFAULT_HEURISTICS = ("magnitude", "woodfisher", "greedy", "cbs", "iht")
REFERENCE = "bnb"
#: (E − E_opt)/E_opt at or below this counts as optimal (the solvers' own tolerances are ~1e-9)
OPTIMAL_RTOL = 1e-6


@dataclass(frozen=True)
class Instance:
    """One block (before k is set): ``source`` is "mlpnet", "random-well" or "random-ill"."""

    block: str
    source: str
    problem: BlockProblem


# ----------------------------------------------------------------------------------------- instances
def random_instance(n: int, seed: int, kind: str) -> BlockProblem:
    """A seeded random block (k set later). ``well``: N = 4n, X Gaussian/√N, λ = 0.1. ``ill``: N = n/2,
    X = (S·R + 0.05·E)/√N with S (N×n/3), R (n/3×n), E Gaussian (strongly correlated columns), λ = 1e-4;
    w Gaussian."""
    rng = np.random.default_rng([n, seed, 0 if kind == "well" else 1])
    if kind == "well":
        N = 4 * n
        X = rng.standard_normal((N, n)) / math.sqrt(N)
        lam = 0.1
    else:
        N = max(1, n // 2)
        r = max(1, n // 3)
        X = (rng.standard_normal((N, r)) @ rng.standard_normal((r, n)) + 0.05 * rng.standard_normal((N, n)))
        X /= math.sqrt(N)
        lam = 1e-4
    return BlockProblem(rng.standard_normal(n), 1, lam, factor=X, label=f"random-{kind}-n{n}-s{seed}")


def random_instances(sizes: list[int], seeds: int) -> list[Instance]:
    """Both kinds, every size and seed."""
    return [Instance(p.label, f"random-{kind}", p) for kind in ("well", "ill") for n in sizes for s in range(seeds)
            for p in [random_instance(n, s, kind)]]


def mlpnet_instances(data_dir: Path | None, fisher_samples: int, damping: float, fc1_sizes: list[int],
                     fc1_chunks: int, seed: int, out: Path, relative_damping: bool = False,
                     sparsity: float = 0.5) -> list[Instance]:
    """Real MLPNet blocks (module docstring); each is also saved, with k for ``sparsity``, to
    ``out/blocks/<label>.npz`` (``cbs solve`` reads it)."""
    import torch

    from engine.blocks import make_blocks
    from engine.data import dataset_for_model
    from engine.fisher import per_sample_gradients
    from engine.models import load_model, prunable_parameters
    from engine.problem_io import save_problem

    data_dir = Path(data_dir) if data_dir is not None else None
    checkpoint = None if data_dir is None else data_dir / "weights" / "woodfisher_mlpnet_mnist.npz"
    model = load_model("mlpnet", checkpoint)
    names = [n for n, _ in prunable_parameters(model)]
    x, y = dataset_for_model("mlpnet", data_dir, "train")
    if fisher_samples > x.shape[0]:
        raise InvalidOptionError(
            f"The '--fisher-samples' argument must be at most {x.shape[0]}. Got {fisher_samples}.")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:fisher_samples]
    grads = per_sample_gradients(model, names, x[idx], y[idx])
    values = {n: p.detach() for n, p in model.named_parameters() if n in names}
    by_name = dict(zip(grads.names, grads.shapes))
    rows = make_blocks(["fc3.weight", "fc2.weight"], [by_name["fc3.weight"], by_name["fc2.weight"]], "row")
    blocks = [(b, b.label) for b in rows]
    for size in dict.fromkeys(fc1_sizes):
        chunks = [b for b in make_blocks(["fc1.weight"], [by_name["fc1.weight"]], "chunk", size) if b.n == size]
        if not chunks or not fc1_chunks:
            continue
        # an input pixel that is constant over the samples (the image border) gives a column parallel to its
        # neighbours' (X_ij = δ_i·x_j): such chunks are rank-deficient and nearly trivial, so take the chunks
        # of highest numerical rank, evenly spaced among those at or above the fc1_chunks-th best rank
        ranks = np.array([np.linalg.matrix_rank(b.gather_columns(grads.rows).double().numpy(), tol=None)
                          for b in chunks])
        cutoff = np.sort(ranks)[::-1][min(fc1_chunks, len(chunks)) - 1]
        pool = [b for b, r in zip(chunks, ranks) if r >= cutoff]
        picks = np.unique(np.linspace(0, len(pool) - 1, fc1_chunks).round().astype(int))
        # chunk labels carry the size: chunk c of size 20 and chunk c of size 50 are different blocks
        blocks += [(pool[i], f"{pool[i].label}@{size}") for i in picks]
    instances = []
    for b, label in blocks:
        X = b.gather_columns(grads.rows).double().numpy() / math.sqrt(grads.n_rows)
        w = b.gather_values(values).double().numpy()
        lam = damping * float(np.mean(np.einsum("ij,ij->j", X, X))) if relative_damping else damping
        problem = BlockProblem(w, n_keep(b.n, sparsity), lam, factor=X, label=f"mlpnet:{label}")
        safe = label.replace("[", "_").replace("]", "").replace("#", "_c").replace("@", "_n").replace(".", "_")
        save_problem(out / "blocks" / f"{safe}.npz", problem)
        instances.append(Instance(problem.label, "mlpnet", problem))
    return instances


# ----------------------------------------------------------------------------------------- running
def heuristic_names(requested: list[str] | None) -> list[str]:
    """``requested``, or the five defaults plus every other available non-exact registered solver."""
    info = {row.name: row for row in solver_info()}
    if requested:
        unknown = [h for h in requested if h not in info]
        if unknown:
            raise InvalidOptionError(
                f"The '--heuristics' argument must name registered solvers ({', '.join(info)}). Got {unknown}.")
        return list(requested)
    extra = [r.name for r in info.values() if not r.exact and r.available and r.name not in DEFAULT_HEURISTICS]
    return [h for h in DEFAULT_HEURISTICS if h in info] + extra


def n_keep(n: int, sparsity: float) -> int:
    """k = round((1 − s)·n), kept in [1, n − 1] so that every instance is a real choice."""
    return int(min(n - 1, max(1, round((1.0 - sparsity) * n))))


def _done(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that run is redone
            done[(r["block"], r["sparsity"], r["solver"])] = r
    return done


def _run(problem: BlockProblem, solver: str, time_limit: float | None, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprovenOptimalityWarning)
        warnings.simplefilter("ignore", IllConditionedWarning)
        t0 = time.perf_counter()
        res = solve_block(problem, get_solver(solver), SolveOptions(time_limit=time_limit, seed=seed))
        elapsed = time.perf_counter() - t0
    return {
        "objective": res.objective, "bound": res.bound, "gap": res.gap, "status": res.status.value,
        "termination": res.termination.value, "time": elapsed, "proven": res.status == Status.OPTIMAL,
        "support": np.flatnonzero(res.support).tolist(), "iterations": res.iterations,
    }


def gap_to(objective: float, reference: float) -> float:
    """(E − E_opt)/E_opt (E_opt > 0 whenever some weight with w_i ≠ 0 is pruned; guarded anyway)."""
    return (objective - reference) / max(abs(reference), 1e-300)


def study(instances: list[Instance], sparsities: list[float], heuristics: list[str], exact: list[str],
          time_limit: float, reference_time_limit: float, exact_max_n: int, seed: int, out: Path,
          show_progress: bool | None = None) -> Path:
    """Run every solver on every (instance, sparsity); append records; returns the records path."""
    path = out / "records.jsonl"
    done = _done(path)
    env = environment()
    jobs = [(inst, s) for inst in instances for s in sparsities]
    for inst, s in progress(jobs, total=len(jobs), desc="instances", enabled=show_progress):
        p = inst.problem
        problem = p.with_n_keep(n_keep(p.n, s))
        common = {"block": inst.block, "source": inst.source, "n": p.n, "k": problem.n_keep,
                  "N": p.n_samples, "damping": p.damping, "sparsity": s}
        ref = done.get((inst.block, s, REFERENCE))
        if ref is None:
            ref = {**common, "solver": REFERENCE, "role": "reference", "time_limit": reference_time_limit,
                   **_run(problem, REFERENCE, reference_time_limit, seed)}
            ref.update(reference_objective=ref["objective"], reference_proven=ref["proven"],
                       gap_to_optimum=0.0 if ref["proven"] else None, environment=env)
            append_jsonl(path, ref)
            done[(inst.block, s, REFERENCE)] = ref
        runs = [(h, "heuristic", None) for h in heuristics]
        runs += [(e, "exact", time_limit) for e in exact if e != REFERENCE and p.n <= exact_max_n]
        for solver, role, limit in runs:
            if (inst.block, s, solver) in done:
                continue
            rec = {**common, "solver": solver, "role": role, "time_limit": limit, **_run(problem, solver, limit, seed)}
            # the best value anyone found is an upper bound on E_opt; the reference's bound a lower one
            rec.update(reference_objective=ref["objective"], reference_proven=ref["proven"],
                       gap_to_optimum=gap_to(rec["objective"], ref["objective"]) if ref["proven"] else None,
                       environment=env)
            append_jsonl(path, rec)
            done[(inst.block, s, solver)] = rec
    return path


# ----------------------------------------------------------------------------------------- summary
def _fmt_pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def summarize(records: list[dict]) -> str:
    """Markdown tables: per source and heuristic, then per exact solver (module docstring)."""
    lines = []
    sources = list(dict.fromkeys(r["source"] for r in records))
    for source in sources:
        rows = [r for r in records if r["source"] == source]
        ref = [r for r in rows if r["solver"] == REFERENCE]
        proven = sum(r["proven"] for r in ref)
        ns = sorted({r["n"] for r in rows})
        lines += [f"### {source}: {len(ref)} instances (n = {', '.join(map(str, ns))}), "
                  f"optimum proven by {REFERENCE} on {proven}", ""]
        lines += ["| heuristic | instances | optimal | mean gap to opt | max gap to opt | mean certified gap "
                  "| mean time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for solver in dict.fromkeys(r["solver"] for r in rows if r["role"] == "heuristic"):
            hs = [r for r in rows if r["solver"] == solver]
            gaps = [r["gap_to_optimum"] for r in hs if r["gap_to_optimum"] is not None]
            cert = [r["gap"] for r in hs if r["gap"] is not None]
            share = f"{100 * np.mean([g <= OPTIMAL_RTOL for g in gaps]):.1f} %" if gaps else "–"
            lines.append(
                f"| {solver} | {len(hs)} | {share} | {_fmt_pct(float(np.mean(gaps)) if gaps else None)} "
                f"| {_fmt_pct(max(gaps) if gaps else None)} | {_fmt_pct(float(np.mean(cert)) if cert else None)} "
                f"| {np.mean([r['time'] for r in hs]):.3f} |")
        sps = sorted({r["sparsity"] for r in rows})
        lines += ["", "Mean gap to opt (share optimal) by sparsity:", "",
                  "| heuristic | " + " | ".join(f"s = {sp:g}" for sp in sps) + " |", "|---|" + "---:|" * len(sps)]
        for solver in dict.fromkeys(r["solver"] for r in rows if r["role"] == "heuristic"):
            cells = []
            for sp in sps:
                gaps = [r["gap_to_optimum"] for r in rows if r["solver"] == solver and r["sparsity"] == sp
                        and r["gap_to_optimum"] is not None]
                cells.append(f"{_fmt_pct(float(np.mean(gaps)))} ({100 * np.mean([g <= OPTIMAL_RTOL for g in gaps]):.0f} %)"
                             if gaps else "–")
            lines.append(f"| {solver} | " + " | ".join(cells) + " |")
        lines += ["", "| exact solver | instances | proven | agrees with reference | median time (s) "
                  "| max time (s) | largest n proven | time limit (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for solver in dict.fromkeys(r["solver"] for r in rows if r["role"] in ("reference", "exact")):
            es = [r for r in rows if r["solver"] == solver]
            ok = [r for r in es if r["proven"]]
            both = [r for r in ok if r["reference_proven"]]
            agree = sum(abs(gap_to(r["objective"], r["reference_objective"])) <= OPTIMAL_RTOL for r in both)
            times = [r["time"] for r in es]
            lines.append(
                f"| {solver} | {len(es)} | {100 * len(ok) / len(es):.1f} % | {agree}/{len(both)} "
                f"| {np.median(times):.3f} | {max(times):.3f} | {max((r['n'] for r in ok), default='–')} "
                f"| {es[0]['time_limit']} |")
        lines.append("")
    lines += [f"Gap to opt = (E_heuristic − E_opt)/E_opt over the instances whose optimum {REFERENCE} proved; "
              f"'optimal' = gap ≤ {OPTIMAL_RTOL:g}. Certified gap = (E − LB)/E with LB the dual bound at the "
              "answer's own residual (available without any exact solver). 'Agrees with reference': proven "
              f"optimum equal to {REFERENCE}'s within {OPTIMAL_RTOL:g}.", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot(records: list[dict], out: Path) -> list[Path]:
    """gap_vs_n.png (mean gap to opt per heuristic, one panel per source) and time_vs_n.png (exact solvers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in records))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.6 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources):
        rows = [r for r in records if r["source"] == source and r["role"] == "heuristic"
                and r["gap_to_optimum"] is not None]
        for solver in dict.fromkeys(r["solver"] for r in rows):
            ns = sorted({r["n"] for r in rows if r["solver"] == solver})
            mean = [np.mean([r["gap_to_optimum"] for r in rows if r["solver"] == solver and r["n"] == n]) for n in ns]
            ax.plot(ns, [100 * m + 1e-4 for m in mean], marker="o", label=solver)
        ax.set_yscale("log")
        ax.set_title(source, fontsize=10)
        ax.set_xlabel("block size n")
        ax.set_ylabel("mean (E − E_opt)/E_opt, % (+1e-4)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gap_path = out / "gap_vs_n.png"
    _save(fig, gap_path)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = [r for r in records if r["role"] in ("reference", "exact")]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        es = [r for r in rows if r["solver"] == solver]
        ns = sorted({r["n"] for r in es})
        line, = ax.plot(ns, [np.median([r["time"] for r in es if r["n"] == n]) for n in ns], marker="o",
                        label=f"{solver} (median)")
        ax.scatter([r["n"] for r in es if r["proven"]], [r["time"] for r in es if r["proven"]], s=8,
                   color=line.get_color(), alpha=0.4)
        ax.scatter([r["n"] for r in es if not r["proven"]], [r["time"] for r in es if not r["proven"]], s=30,
                   marker="x", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("block size n (all sources and sparsities)")
    ax.set_ylabel("seconds (x: not proven within its limit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    time_path = out / "time_vs_n.png"
    _save(fig, time_path)
    return [gap_path, time_path]


# ----------------------------------------------------------------------------------------- CLI
_sparsity = number_type(float, 0.0, 1.0, low_open=True, high_open=True, what="a number in (0, 1)")
_size = number_type(int, 2, what="an integer >= 2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", choices=("mlpnet", "random"), default=["mlpnet", "random"])
    ap.add_argument("--data-dir", type=Path, default=None, help="folder laid out like ../shared/data")
    ap.add_argument("--sparsities", nargs="+", type=_sparsity, default=[0.5, 0.7, 0.9, 0.95])
    ap.add_argument("--fisher-samples", type=POSITIVE_INT, default=1000)
    ap.add_argument("--damping", type=POSITIVE, default=1e-3, help="λ of the MLPNet blocks (absolute)")
    ap.add_argument("--relative-damping", action="store_true",
                    help="λ = damping · mean(diag F) per block instead (harder blocks: fc1 curvature then matters)")
    ap.add_argument("--fc1-sizes", nargs="+", type=_size, default=[20, 40, 60, 80, 100])
    ap.add_argument("--fc1-chunks", type=NONNEG_INT, default=2, help="chunks of fc1 per size")
    ap.add_argument("--random-sizes", nargs="+", type=_size, default=[12, 18, 24])
    ap.add_argument("--random-seeds", type=NONNEG_INT, default=2)
    ap.add_argument("--heuristics", nargs="+", default=None,
                    help="default: magnitude woodfisher greedy cbs iht + every other non-exact registered solver")
    ap.add_argument("--exact", nargs="*", default=["highs", "pyomo", "cvxpy"],
                    help=f"exact solvers besides the reference {REFERENCE} (unavailable ones are skipped)")
    ap.add_argument("--time-limit", type=POSITIVE, default=10.0, help="per block, for --exact solvers")
    ap.add_argument("--reference-time-limit", type=POSITIVE, default=60.0, help=f"per block, for {REFERENCE}")
    ap.add_argument("--exact-max-n", type=POSITIVE_INT, default=20, help="run --exact solvers on n <= this")
    ap.add_argument("--seed", type=NONNEG_INT, default=0)
    ap.add_argument("--threads", type=POSITIVE_INT, default=1, help="torch threads (set OMP/MKL/OPENBLAS too)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/exact_vs_heuristic"))
    args = ap.parse_args(argv)
    try:
        heuristics = heuristic_names(args.heuristics)
        info = {row.name: row for row in solver_info()}
        bad = [e for e in args.exact if e not in info or not info[e].exact]
        if bad:
            raise InvalidOptionError(f"The '--exact' argument must name exact solvers "
                                     f"({', '.join(n for n, r in info.items() if r.exact)}). Got {bad}.")
    except InvalidOptionError as exc:
        ap.error(str(exc))
    exact = [e for e in args.exact if info[e].available]
    for e in args.exact:
        if not info[e].available:
            print(f"skipping {e}: not installed ({info[e].install})")

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    instances = []
    if "mlpnet" in args.sources:
        instances += mlpnet_instances(args.data_dir, args.fisher_samples, args.damping, args.fc1_sizes,
                                      args.fc1_chunks, args.seed, args.out, args.relative_damping,
                                      args.sparsities[0])
    if "random" in args.sources:
        instances += random_instances(args.random_sizes, args.random_seeds)
    write_json_atomic(args.out / "settings.json", {**{k: v for k, v in vars(args).items()},
                                                   "heuristics": heuristics, "exact": exact,
                                                   "instances": [i.block for i in instances]})
    path = study(instances, args.sparsities, heuristics, exact, args.time_limit, args.reference_time_limit,
                 args.exact_max_n, args.seed, args.out, show_progress=False if args.no_progress else None)
    blocks = {i.block for i in instances}
    # _done keeps the last record per (block, sparsity, solver): a run redone after a crash counts once
    records = [r for r in _done(path).values() if r["block"] in blocks and r["sparsity"] in args.sparsities]
    summary = args.out / "summary.md"
    atomic_write_bytes(summary, ("# Exact vs heuristic\n\n" + summarize(records)).encode())
    plots = plot(records, args.out)
    print(f"wrote {path}, {summary}, {', '.join(map(str, plots))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
