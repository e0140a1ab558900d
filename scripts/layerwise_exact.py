"""Exact against heuristic on real rows of the reconstruction objective (MLPNet, charlm, ResNet20).

For every chosen row of a layer (its calibration H from the dense model, λ = 0.01 · mean diag H), the best
support the exact solvers find (brute force where C(n, k), or C(M, N)^(n/M) under a pattern, is small; bnb
otherwise, with a time limit per row: proven or not, with its bound), and how far each heuristic's E(S)
(after the refit) is from it, beside the certified gap each reports on its own. SparseGPT takes part under
patterns only (unstructured, it picks its own count per row, so its rows are not the k of the others).

    python scripts/layerwise_exact.py --model mlpnet [--layers fc3 fc2] [--patterns unstructured 2:4]
    python scripts/layerwise_exact.py --model charlm --layers model.transformer.h.0.attn.c_attn \\
        model.transformer.h.0.mlp.c_fc --rows 16 --time-limit 20
    python scripts/layerwise_exact.py --model resnet20 --layers layer1.0.conv1 --time-limit 20 [--executor ray]

Writes ``<model>/rows.jsonl`` (one record per row and method), ``<model>/summary.md`` and one gap
distribution plot per layer and pattern (``<model>/<layer>_<pattern>.png``, with the ``plots`` extra) under
``--out`` (default results/layerwise_exact). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.calibration import layer_hessians  # noqa: E402
from engine.certificate import tighten_bound  # noqa: E402
from engine.hub import is_transposed_linear  # noqa: E402
from engine.layerwise import layer_damping, layer_rows  # noqa: E402
from engine.options import SolveOptions  # noqa: E402
from engine.records import append_jsonl, environment  # noqa: E402
from engine.executor import EXECUTORS, make_executor  # noqa: E402
from engine.solve import solve_block  # noqa: E402
from engine.solvers.registry import get_solver  # noqa: E402
from formulations import objective as obj  # noqa: E402
from formulations.patterns import parse_pattern, pattern_keep  # noqa: E402
from formulations.problem import BlockProblem, eigen_factor  # noqa: E402
from formulations.sparsegpt import sparsegpt  # noqa: E402

HEURISTICS = {"unstructured": ["magnitude", "wanda", "woodfisher", "greedy", "admm", "swap"],
              "pattern": ["magnitude", "wanda", "woodfisher", "sparsegpt", "admm", "swap"]}
DEFAULT_LAYERS = {"mlpnet": ["fc3", "fc2"], "resnet20": ["layer1.0.conv1"],
                  "charlm": ["model.transformer.h.0.attn.c_attn", "model.transformer.h.0.mlp.c_fc"]}


def _model_and_batches(name: str, data_dir: str | None, count: int):
    """The dense model and ``count`` calibration inputs (seed 0) in batches."""
    if name == "charlm":
        from engine.charlm import calibration_windows, charlm_data, load_charlm

        model, _ = load_charlm()
        train, _ = charlm_data(data_dir)
        return model, calibration_windows(train, count)
    from engine.data import load_cifar10, load_mnist
    from engine.models import load_model

    model = load_model(name, None)
    # the 10k CIFAR-10 subset: the calibration draw docs/exact.md's figures were measured on
    x, _ = (load_mnist(data_dir, "train") if name == "mlpnet" else load_cifar10(data_dir, "train-10k"))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    return model, [x[order[s : s + 250]] for s in range(0, len(order), 250)]


def _rows(W: np.ndarray, count: int | None) -> list[int]:
    """All rows, or ``count`` evenly spaced ones."""
    if count is None or count >= W.shape[0]:
        return list(range(W.shape[0]))
    return sorted({int(i) for i in np.linspace(0, W.shape[0] - 1, count)})


def _study(layer, W, H, text, args, rows_path):
    """One layer under one pattern; returns the summary line and the excess per method."""
    n = W.shape[1]
    lam = layer_damping(H)
    pattern = parse_pattern(text)
    k = n // 2 if pattern is None else pattern_keep(n, pattern)
    count = math.comb(n, k) if pattern is None else math.comb(pattern[1], pattern[0]) ** (n // pattern[1])
    exact = "brute_force" if count <= 2_000_000 else "bnb"
    own = sparsegpt(W, H + lam * np.eye(n), 0.5, pattern, block=128)[1] if pattern is not None else None
    methods = HEURISTICS["pattern" if pattern else "unstructured"]
    stats: dict[str, list] = {m: [] for m in methods}
    proven, seconds, exact_gaps = 0, [], []
    chosen = _rows(W, args.rows)
    problems = _row_problems(layer, W, H, text, args.rows)
    heuristic = []
    for i, p in zip(chosen, problems):
        results = {}
        for method in methods:
            if method == "sparsegpt":
                sol = obj.optimal_update(p, own[i])
                cert = tighten_bound(p, own[i], sol.objective, sol.residual, sol.weights, None)  # the default budget
                results[method] = (sol.objective, obj.relative_gap(sol.objective, cert.bound), own[i])
            else:
                r = solve_block(p, method)
                results[method] = (r.objective, r.gap, r.support)
        heuristic.append(results)
    # the exact search starts from the best heuristic answer (a warm start, as a user would give it); the rows
    # run on --executor (each checked and certified where it runs, as solve_block does)
    warm = [min(results.values(), key=lambda t: t[0])[2] if exact == "bnb" else None for results in heuristic]
    params = {"max_size": n} if exact == "brute_force" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unproven row is recorded, not warned about row by row
        bests = args.pool.solve(get_solver(exact, **params), problems,
                                [SolveOptions(time_limit=args.time_limit)] * len(problems), f"{exact} ({layer})",
                                warm_starts=warm)
    for i, results, best in zip(chosen, heuristic, bests):
        ok = best.status.value == "optimal"
        proven += ok
        seconds.append(best.wall_time)
        exact_gaps.append(best.gap or 0.0)
        for method, (e, cert, _) in results.items():
            excess = (e - best.objective) / max(abs(best.objective), 1e-300)
            stats[method].append((excess, cert))
            append_jsonl(rows_path, {"layer": layer, "row": i, "pattern": text, "n": n, "k": k, "method": method,
                                     "objective": e, "best": best.objective, "bound": best.bound,
                                     "best_proven": ok, "excess": excess, "certified_gap": cert,
                                     "exact_solver": exact, "exact_seconds": best.wall_time,
                                     "exact_nodes": best.iterations})
    line = {"layer": layer, "pattern": text, "rows": len(chosen), "of": W.shape[0], "n": n, "k": k, "exact": exact,
            "proven": proven, "median_seconds": float(np.median(seconds)), "max_exact_gap": float(max(exact_gaps)),
            "median_exact_gap": float(np.median(exact_gaps))}
    for method, vals in stats.items():
        gaps = np.array([v[0] for v in vals])
        certs = [v[1] for v in vals if v[1] is not None]
        line[method] = (float(np.mean(gaps)), float(np.max(gaps)), float(np.mean(gaps <= 1e-9)),
                        float(np.median(certs)) if certs else None)
    return line, {m: [v[0] for v in vals] for m, vals in stats.items()}


def _row_problems(layer: str, W: np.ndarray, H: np.ndarray, text: str, count: int | None) -> list[BlockProblem]:
    """The chosen rows of a layer as problems sharing H (λ = 0.01 · mean diag H; k = n/2 or the pattern's)."""
    n = W.shape[1]
    pattern = parse_pattern(text)
    k = n // 2 if pattern is None else pattern_keep(n, pattern)
    template = BlockProblem(W[0], k, layer_damping(H), factor=eigen_factor(H), pattern=pattern)
    return [template.with_weights(W[i], f"{layer}[{i}]") for i in _rows(W, count)]


def _export(layer: str, W: np.ndarray, H: np.ndarray, text: str, args) -> None:
    from engine.problem_io import save_problem

    folder = args.export / f"{layer.replace('.', '_')}_{text.replace(':', '-')}"
    folder.mkdir(parents=True, exist_ok=True)
    for p in _row_problems(layer, W, H, text, args.rows):
        save_problem(folder / f"row{p.label.rsplit('[', 1)[1].rstrip(']')}.npz", p)


def _plot(model: str, out: Path, layer: str, text: str, excess: dict, line: dict) -> None:
    try:
        from engine.plots import gap_distribution_plot

        gap_distribution_plot(excess, out / f"{layer.replace('.', '_')}_{text.replace(':', '-')}.png",
                              f"{model} {layer}, {text}: n = {line['n']}, k = {line['k']}, {line['rows']} rows "
                              f"(E* by {line['exact']}, proven on {line['proven']})")
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)


def _redraw(model: str, rows_path: Path, out: Path) -> int:
    from engine.records import read_jsonl

    rows = read_jsonl(rows_path)
    for layer, text in dict.fromkeys((r["layer"], r["pattern"]) for r in rows):
        mine = [r for r in rows if r["layer"] == layer and r["pattern"] == text]
        excess = {m: [r["excess"] for r in mine if r["method"] == m] for m in dict.fromkeys(r["method"] for r in mine)}
        first = [r for r in mine if r["method"] == mine[0]["method"]]
        line = {"n": mine[0]["n"], "k": mine[0]["k"], "rows": len(first), "exact": mine[0]["exact_solver"],
                "proven": sum(r["best_proven"] for r in first)}
        _plot(model, out, layer, text, excess, line)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlpnet", choices=sorted(DEFAULT_LAYERS))
    parser.add_argument("--layers", nargs="+", default=None, help="module names (default: the model's in DEFAULT_LAYERS)")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--calibration", type=int, default=None,
                        help="calibration inputs (default 1000 images, 128 charlm windows)")
    parser.add_argument("--rows", type=int, default=None, help="evenly spaced rows per layer (default: all)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds of the exact solver per row")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "layerwise_exact")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from <out>/<model>/rows.jsonl")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="only write the chosen rows as `cbs solve` problems (.npz, k = n/2 or the pattern's) to "
                             "DIR/<layer>_<pattern>/ and stop (e.g. for scripts/certificate_study.py)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where the exact solves of a layer's rows run (default: processes with --workers > 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes, or Ray tasks in flight")
    parser.add_argument("--ray-address", default=None, help="the Ray cluster to join with --executor ray")
    args = parser.parse_args()
    args.pool = make_executor(args.executor, args.workers, args.ray_address, "layerwise_exact.py")
    torch.set_num_threads(1)
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    if args.plots_only:
        return _redraw(args.model, rows_path, out)
    if rows_path.exists():
        rows_path.unlink()
    layers = args.layers or DEFAULT_LAYERS[args.model]
    count = args.calibration or (128 if args.model == "charlm" else 1000)
    model, batches = _model_and_batches(args.model, args.data_dir, count)
    modules = dict(model.named_modules())
    grams = layer_hessians(model, [(n, modules[n]) for n in layers], batches)
    summary = []
    for layer in layers:
        H = grams[layer].hessian
        W = layer_rows(modules[layer], is_transposed_linear(modules[layer])).double().numpy()
        if args.export is not None:
            for text in args.patterns:
                _export(layer, W, H, text, args)
            continue
        for text in args.patterns:
            line, excess = _study(layer, W, H, text, args, rows_path)
            summary.append(line)
            print(line, file=sys.stderr)
            _plot(args.model, out, layer, text, excess, line)
    if args.export is not None:
        print(f"wrote the rows to {args.export}", file=sys.stderr)
        return 0
    md = [f"Rows of {args.model} under the reconstruction objective (calibration: {count} training inputs, seed 0; "
          "λ = 0.01 · mean diag H). Per method: mean / max of (E − E*)/E* over the rows, E* the best support the "
          "exact solver found (proven optimal on the rows counted), the share of rows at E*, and the median "
          "certified gap the method reports on its own.", ""]
    for line in summary:
        rows = f"{line['rows']} of {line['of']} rows" if line["rows"] < line["of"] else f"{line['rows']} rows"
        md.append(f"**{line['layer']}, {line['pattern']}** ({rows}, n = {line['n']}, k = {line['k']}; E* by "
                  f"{line['exact']}, {args.time_limit:g} s limit per row: proven on {line['proven']}/{line['rows']}, "
                  f"median {line['median_seconds']:.2g} s, exact solver's gap median "
                  f"{100 * line['median_exact_gap']:.3g} %, max {100 * line['max_exact_gap']:.3g} %)")
        md.append("")
        md.append("| method | mean excess | max excess | rows at E* | median certified gap |")
        md.append("|---|---|---|---|---|")
        for method in HEURISTICS["pattern" if line["pattern"] != "unstructured" else "unstructured"]:
            if method in line:
                mean, mx, share, cert = line[method]
                md.append(f"| {method} | {100 * mean:.2f} % | {100 * mx:.2f} % | {100 * share:.0f} % | "
                          f"{'–' if cert is None else f'{100 * cert:.3g} %'} |")
        md.append("")
    md.append(f"environment: {environment()['versions']}")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
