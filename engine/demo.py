"""``cbs demo``: the embedded default job (no download, no shared data, about a minute on 2 cores).

Trains a small bias-free MLP (64-64-32-10) on scikit-learn's 8x8 digits shipped inside the package,
prunes a copy of it at several sparsities with every built-in heuristic (one block per layer, global
magnitude budget, N = all training samples), and writes a table (markdown), the records (JSONL) and an
accuracy-vs-sparsity plot (PNG).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from .data import load_digits
from .errors import invalid_option
from .evaluate import evaluate
from .models import prunable_parameters, small_mlp
from .plots import accuracy_plot
from .progress import progress
from .pruner import PruneConfig, prune
from .records import append_jsonl, atomic_write_bytes, environment, write_json_atomic

__all__ = ["run_demo", "train_small_mlp", "DEMO_METHODS"]

#: (label, method, update) rows of the demo
DEMO_METHODS = (
    ("magnitude", "magnitude", False),
    ("magnitude+update", "magnitude", True),
    ("woodfisher", "woodfisher", True),
    ("greedy", "greedy", True),
    ("iht", "iht", True),
    ("cbs", "cbs", True),
)


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


def run_demo(
    out: str | Path = "results/demo",
    sparsities: list[float] | tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9),
    methods: list[str] | None = None,
    seed: int = 0,
    epochs: int = 200,
    show_progress: bool | None = None,
) -> tuple[str, list[Path]]:
    """Run the demo; returns (markdown table, written paths)."""
    known = [m[0] for m in DEMO_METHODS]
    chosen = [m for m in DEMO_METHODS if methods is None or m[0] in methods]
    unknown = [m for m in (methods or []) if m not in known]
    if unknown:
        raise invalid_option("methods", "run_demo()", f"a subset of {', '.join(known)}", unknown)
    for s in sparsities:
        if not 0 <= s < 1:
            raise invalid_option("sparsities", "run_demo()", "numbers in [0, 1)", s)
    out = Path(out)
    model, train_seconds = train_small_mlp(epochs=epochs, seed=seed)
    x_train, y_train = load_digits("train", seed=seed)
    x_test, y_test = load_digits("test", seed=seed)
    dense_acc, _ = evaluate(model, x_test, y_test)
    names = [n for n, _ in prunable_parameters(model)]
    rows = []
    records = out / "records.jsonl"
    if records.exists():
        records.unlink()
    jobs = [(m, s) for m in chosen for s in sparsities]
    for (label, method, update), sparsity in progress(jobs, total=len(jobs), desc="demo", enabled=show_progress):
        pruned = copy.deepcopy(model)
        config = PruneConfig(
            sparsity=sparsity, method=method, update=update, fisher_samples=x_train.shape[0], damping=1e-3,
            block_mode="layer", seed=seed, progress=False,
        )
        start = time.perf_counter()
        report = prune(pruned, names, x_train, y_train, config)
        seconds = time.perf_counter() - start
        acc, loss = evaluate(pruned, x_test, y_test)
        gaps = [b.gap for b in report.blocks if b.gap is not None]
        row = {
            "label": label, "method": method, "update": update, "sparsity": sparsity,
            "achieved_sparsity": report.achieved_sparsity, "accuracy": acc, "test_loss": loss,
            "seconds": seconds, "objective": sum(b.objective for b in report.blocks),
            "max_gap": max(gaps) if gaps else None,
        }
        rows.append(row)
        append_jsonl(records, {**row, "seed": seed})
    header = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    lines = [
        f"Dense accuracy {dense_acc:.2f} % (trained in {train_seconds:.1f} s). Cells: test accuracy % (seconds).",
        "",
        header,
        "|" + "---|" * (len(sparsities) + 1),
    ]
    for label, _, _ in chosen:
        cells = [next(r for r in rows if r["label"] == label and r["sparsity"] == s) for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(f"{c['accuracy']:.2f} ({c['seconds']:.1f})" for c in cells) + " |")
    table = "\n".join(lines)
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    write_json_atomic(out / "record.json", {
        "dense_accuracy": dense_acc, "train_seconds": train_seconds, "seed": seed, "epochs": epochs,
        "sparsities": list(sparsities), "rows": rows, "environment": environment(),
    })
    accuracy_plot(rows, out / "demo.png", "One-shot pruning of a 64-64-32-10 MLP on 8x8 digits", dense=dense_acc)
    return table, [out / "table.md", records, out / "record.json", out / "demo.png"]
