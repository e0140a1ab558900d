"""Experiment: row budgets across the layers of charlm by the exact loss-curve knapsack, against uniform.

Layers' reconstruction errors are in different units (each layer's output scale), so every row's curve is
divided by its layer's dense output energy Σ_i w_iᵀ H w_i (a relative error); the knapsack
(``engine.budget.loss_curve_allocation``) then splits the global budget over all rows of all layers, with
every H taken from the dense model (the budgets are set before any layer is pruned). The pruning itself is
the usual sequential pass with those row budgets (``prune_layerwise(..., row_budgets=...)``).

    python scripts/layerwise_budget.py [--sparsity 0.7] [--methods magnitude+refit admm+refit] [--windows 0]

Writes ``budget.jsonl`` and prints the validation loss beside uniform budgets. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.budget import loss_curve_allocation  # noqa: E402
from engine.calibration import layer_hessians  # noqa: E402
from engine.charlm import charlm_data, evaluate_charlm, load_charlm  # noqa: E402
from engine.layerwise import check_layers, layer_rows, prune_layerwise  # noqa: E402
from engine.params import select_parameters  # noqa: E402
from engine.records import append_jsonl, environment  # noqa: E402
from formulations.problem import BlockProblem, eigen_factor  # noqa: E402


def global_row_budgets(model, names, calibration, sparsity: float, rel_damping: float = 0.01) -> dict[str, list[int]]:
    """k for every row of every layer: the knapsack over all rows' relative loss curves (module docstring)."""
    layers, _ = check_layers(model, names, pattern=None, allocation="uniform", method="magnitude", solver_params=None)
    grams = layer_hessians(model, [(m, mod) for m, mod, _ in layers], calibration)
    rows, owners = [], []
    for pname, (mname, module, transposed) in zip(names, layers):
        H = grams[mname].hessian
        W = layer_rows(module, transposed).double().numpy()
        energy = float(np.einsum("oi,ij,oj->", W, H, W)) or 1.0
        lam = rel_damping * float(np.mean(np.diag(H))) or rel_damping
        # E scales with X² and λ alike: the factor X/√energy and λ/energy give E/energy
        template = BlockProblem(W[0], 0, lam / energy, factor=eigen_factor(H) / np.sqrt(energy))
        rows += [template.with_weights(W[i]) for i in range(W.shape[0])]
        owners += [pname] * W.shape[0]
    total = sum(p.n for p in rows)
    ks = loss_curve_allocation(rows, int(round((1 - sparsity) * total))).n_keep
    out: dict[str, list[int]] = {}
    for pname, k in zip(owners, ks):
        out.setdefault(pname, []).append(int(k))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--methods", nargs="+", default=["magnitude+refit", "admm+refit"])
    parser.add_argument("--windows", type=int, default=0, help="validation windows (0: all 871)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "layerwise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, _ = load_charlm()
    train, val = charlm_data(args.data_dir)
    names, _ = select_parameters(model)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:128]
    calibration = [torch.stack([train[int(i)][0] for i in order[s : s + 32]]) for s in range(0, 128, 32)]
    windows = args.windows or None
    start = time.perf_counter()
    budgets = global_row_budgets(model, names, calibration, args.sparsity)
    budget_seconds = time.perf_counter() - start
    layer_density = {n: sum(k) / (len(k) * layer_rows(*_module(model, n)).shape[1]) for n, k in budgets.items()}
    for method in args.methods:
        base = method.removesuffix("+refit")
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        _, layers = prune_layerwise(pruned, names, calibration, sparsity=args.sparsity, method=base,
                                    refit=method.endswith("+refit"), row_budgets=budgets)
        seconds = time.perf_counter() - t0
        loss = evaluate_charlm(pruned, val, windows=windows).loss
        record = {"method": method, "sparsity": args.sparsity, "budgets": "global loss curve", "val_loss": loss,
                  "error": sum(r.error for r in layers), "seconds": seconds, "budget_seconds": budget_seconds,
                  "layer_density": layer_density, "windows": args.windows, "environment": environment()}
        append_jsonl(args.out / "budget.jsonl", record)
        print(f"{method} at {args.sparsity:g}, budgets across layers: val {loss:.4f}, error {record['error']:.4g}, "
              f"{seconds:.0f} s + {budget_seconds:.0f} s of budgets", file=sys.stderr)
    print({n.replace("model.transformer.", ""): round(d, 3) for n, d in layer_density.items()}, file=sys.stderr)
    return 0


def _module(model, pname):
    from engine.hub import is_transposed_linear

    module = dict(model.named_modules())[pname.rsplit(".", 1)[0]]
    return module, is_transposed_linear(module)


if __name__ == "__main__":
    sys.exit(main())
