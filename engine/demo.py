"""``cbs demo``: the embedded default job (no download, no shared data, a minute or two on 2 cores).

Trains a small bias-free MLP (64-64-32-10) on scikit-learn's 8x8 digits shipped inside the package, then
shows what the product does:

1. **One-shot pruning at several sparsities**: the recommended configuration (what ``cbs prune`` runs when no
   method is named: multi-stage magnitude selection with the CBS-U update, the first-order term and the step
   search) and the ``swap`` local search beside the baselines (magnitude with and without the update,
   WoodFisher, IHT, the paper's ``cbs``), each named method in one stage with one block per layer and
   N = all training samples.
2. **Exact against heuristic on small blocks**: a few rows of the last layer solved to proven optimality by
   branch and bound, and each heuristic's loss E(S) above that optimum beside its own certified gap.

Writes a table (markdown), the records (JSONL and JSON) and an accuracy-vs-sparsity plot (PNG, with the
``plots`` extra).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_digits
from .errors import invalid_option
from .evaluate import evaluate
from .models import prunable_parameters, small_mlp
from .progress import get_logger, progress
from .pruner import PruneConfig, prune
from .outdir import check_out, locked
from .records import append_jsonl, atomic_write_bytes, environment, staged_folder, write_json_atomic

__all__ = ["run_demo", "train_small_mlp", "DEMO_METHODS", "exact_vs_heuristic"]

log = get_logger(__name__)

#: (label, method, update) rows of the demo; method None is the recommendation
DEMO_METHODS = (
    ("recommended", None, True),
    ("swap", "swap", True),
    ("cbs", "cbs", True),
    ("iht", "iht", True),
    ("woodfisher", "woodfisher", True),
    ("magnitude+update", "magnitude", True),
    ("magnitude", "magnitude", False),
)

#: what a demo writes into its folder; a folder holding only these is a previous demo's and is replaced
DEMO_FILES = ("table.md", "records.jsonl", "record.json", "demo.png")
#: heuristics compared with the proven optimum on small blocks
GAP_METHODS = ("magnitude", "woodfisher", "greedy", "swap")


def train_small_mlp(epochs: int = 200, seed: int = 0, lr: float = 1e-2) -> tuple[nn.Module, float]:
    """Train the demo MLP on the digits training split (full batch Adam); returns (model, seconds)."""
    x, y = load_digits("train", seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = small_mlp(hidden=(64, 32))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, time.perf_counter() - start


def exact_vs_heuristic(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float = 0.8, rows: int = 4,
                       seed: int = 0) -> list[dict]:
    """Rows of the model's last layer as blocks (N = all training samples, λ = 1e-3): each solved to proven
    optimality by branch and bound and by each of :data:`GAP_METHODS`; per block and method the loss E(S),
    its excess over the optimum (the true gap) and the certified gap the heuristic reports on its own."""
    from formulations.problem import BlockProblem

    from .blocks import make_blocks
    from .fisher import per_sample_gradients
    from .options import SolveOptions
    from .solve import solve_block
    from .solvers.registry import get_solver

    names = [n for n, _ in prunable_parameters(model)]
    last = names[-1]
    grads = per_sample_gradients(model, [last], x, y)
    weights = dict(model.named_parameters())[last].detach()
    out = []
    for block in make_blocks([last], [weights.shape], "row")[:rows]:
        X = block.gather_columns(grads.rows).double().numpy() / np.sqrt(grads.n_rows)
        w = block.gather_values({last: weights}).double().numpy()
        problem = BlockProblem(w, round((1 - sparsity) * w.size), 1e-3, factor=X, label=block.label)
        exact = solve_block(problem, get_solver("bnb"), SolveOptions(seed=seed, time_limit=60))
        row = {"block": block.label, "n": problem.n, "k": problem.n_keep, "optimum": exact.objective,
               "proven": exact.status.value == "optimal", "seconds": exact.wall_time}
        for name in GAP_METHODS:
            r = solve_block(problem, get_solver(name), SolveOptions(seed=seed))
            # the true gap in the unit of the certified one, (E − optimum)/|E|: never above it
            row[name] = {"objective": r.objective, "true_gap": (r.objective - exact.objective) / abs(r.objective),
                         "certified_gap": r.gap}
        out.append(row)
    return out


def run_demo(
    out: str | Path = "results/demo",
    sparsities: list[float] | tuple[float, ...] = (0.5, 0.7, 0.8, 0.9),
    methods: list[str] | None = None,
    seed: int = 0,
    epochs: int = 200,
    show_progress: bool | None = None,
    overwrite: bool = False,
    where: str | None = None,
) -> tuple[str, list[Path]]:
    """Run the demo; returns (markdown tables, written paths).

    ``out`` must be new, empty, or hold only a previous demo's files (:data:`DEMO_FILES`), which are replaced
    as a whole at the end; anything else needs ``overwrite``. ``where`` names the caller in messages."""
    known = [m[0] for m in DEMO_METHODS]
    chosen = [m for m in DEMO_METHODS if methods is None or m[0] in methods]
    unknown = [m for m in (methods or []) if m not in known]
    if unknown:
        raise invalid_option("methods", "run_demo()", f"a subset of {', '.join(known)}", unknown)
    for s in sparsities:
        if not 0 <= s < 1:
            raise invalid_option("sparsities", "run_demo()", "numbers in [0, 1)", s)
    out = check_out(out, "run_demo()" if where is None else where, overwrite=overwrite, owned=DEMO_FILES)
    with locked(out, where or "run_demo()"), staged_folder(out) as stage:  # the folder changes as a whole
        table = _run(stage, chosen, sparsities, seed, epochs, show_progress)
    paths = [out / name for name in DEMO_FILES if (out / name).exists()]
    return table, paths


def _run(out: Path, chosen: list, sparsities, seed: int, epochs: int, show_progress: bool | None) -> str:
    from .pipeline import execute, prepare

    model, train_seconds = train_small_mlp(epochs=epochs, seed=seed)
    x_train, y_train = load_digits("train", seed=seed)
    x_test, y_test = load_digits("test", seed=seed)
    dense_acc, _ = evaluate(model, x_test, y_test)
    names = [n for n, _ in prunable_parameters(model)]
    rows = []
    records = out / "records.jsonl"
    jobs = [(m, s) for m in chosen for s in sparsities]
    recommendation = ""
    for (label, method, update), sparsity in progress(jobs, total=len(jobs), desc="demo", enabled=show_progress):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        if method is None:
            run = prepare(pruned, (x_train, y_train), sparsity=sparsity, settings={"seed": seed, "progress": False})
            recommendation = run.chosen
            report = execute(run)
            blocks, achieved = report["blocks"], report["achieved_sparsity"]
        else:
            config = PruneConfig(sparsity=sparsity, method=method, update=update, fisher_samples=x_train.shape[0],
                                 damping=1e-3, block_mode="layer", seed=seed, progress=False)
            result = prune(pruned, names, (x_train, y_train), config)
            blocks, achieved = [b.__dict__ for b in result.blocks], result.achieved_sparsity
        seconds = time.perf_counter() - start
        acc, loss = evaluate(pruned, x_test, y_test)
        gaps = [b["gap"] for b in blocks if b["gap"] is not None]
        objectives = [b["objective"] for b in blocks]
        row = {"label": label, "method": method or "recommended", "update": update, "sparsity": sparsity,
               "achieved_sparsity": achieved, "accuracy": acc, "test_loss": loss, "seconds": seconds,
               "objective": None if None in objectives else float(sum(objectives)),
               "max_gap": max(gaps) if gaps else None}
        rows.append(row)
        append_jsonl(records, {**row, "seed": seed})
    gap_rows = exact_vs_heuristic(model, x_train, y_train, seed=seed)
    table = _tables(rows, chosen, sparsities, dense_acc, train_seconds, recommendation, gap_rows)
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    write_json_atomic(out / "record.json", {
        "dense_accuracy": dense_acc, "train_seconds": train_seconds, "seed": seed, "epochs": epochs,
        "sparsities": list(sparsities), "recommendation": recommendation, "rows": rows,
        "exact_vs_heuristic": gap_rows, "environment": environment(),
    })
    from .plots import accuracy_plot, plots_available

    if plots_available():
        accuracy_plot(rows, out / "demo.png", "One-shot pruning of a 64-64-32-10 MLP on 8x8 digits", dense=dense_acc)
    else:
        log.warning("no plot: matplotlib is not installed (pip install 'cbs-prune[plots]')")
    return table


def _tables(rows, chosen, sparsities, dense_acc, train_seconds, recommendation, gap_rows) -> str:
    header = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    lines = [
        f"Dense accuracy {dense_acc:.2f} % (trained in {train_seconds:.1f} s). Cells: test accuracy % (seconds).",
        f"recommended = cbs prune's choice for this model and data: {recommendation}" if recommendation else "",
        "",
        header,
        "|" + "---|" * (len(sparsities) + 1),
    ]
    for label, _, _ in chosen:
        cells = [next(r for r in rows if r["label"] == label and r["sparsity"] == s) for s in sparsities]
        best = [max(r["accuracy"] for r in rows if r["sparsity"] == s) for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(
            (f"**{c['accuracy']:.2f}**" if c["accuracy"] == b else f"{c['accuracy']:.2f}") + f" ({c['seconds']:.1f})"
            for c, b in zip(cells, best)) + " |")
    lines += ["", "Exact against heuristic: rows of the last layer at sparsity 0.8, E(S) above the proven optimum "
              "(branch and bound) / the certified gap each heuristic reports on its own.", "",
              "| block (n, k) | optimum | " + " | ".join(GAP_METHODS) + " |", "|" + "---|" * (len(GAP_METHODS) + 2)]
    for g in gap_rows:
        cells = [f"{100 * g[m]['true_gap']:.1f} % / {100 * g[m]['certified_gap']:.0f} %"
                 if g[m]["certified_gap"] is not None else f"{100 * g[m]['true_gap']:.1f} % / –" for m in GAP_METHODS]
        lines.append(f"| {g['block']} ({g['n']}, {g['k']}) | {g['optimum']:.4g}{'' if g['proven'] else ' (not proven)'}"
                     f" | " + " | ".join(cells) + " |")
    return "\n".join(lines)
