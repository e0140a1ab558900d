"""Seconds of layer-wise pruning of charlm, per method and per layer (the speed target of docs/layerwise.md).

    python scripts/layerwise_speed.py [--sparsity 0.5] [--methods magnitude wanda sparsegpt greedy admm]
        [--threads 2] [--out results/layerwise]

Each method prunes a fresh copy of charlm (128 calibration windows, seed 0, sequential, with the refit but for
SparseGPT as published), and the script writes ``speed.md`` (a table of per-layer seconds, including each
layer's calibration pass) and ``speed.jsonl``. Run it on an otherwise idle machine. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.charlm import calibration_windows, charlm_data, load_charlm  # noqa: E402
from engine.layerwise import prune_layerwise  # noqa: E402
from engine.params import select_parameters  # noqa: E402
from engine.records import append_jsonl, environment  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "greedy", "admm"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "layerwise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, _ = load_charlm()
    train, _ = charlm_data(args.data_dir)
    names, _ = select_parameters(model)
    calibration = calibration_windows(train, 128)
    per_layer, totals = {}, {}
    for method in args.methods:
        start = time.perf_counter()
        _, layers = prune_layerwise(copy.deepcopy(model), names, calibration, sparsity=args.sparsity, method=method,
                                    refit=method != "sparsegpt")
        totals[method] = time.perf_counter() - start
        per_layer[method] = [(r.name, r.d_out, r.d_in, r.seconds) for r in layers]
        append_jsonl(args.out / "speed.jsonl", {"method": method, "sparsity": args.sparsity, "threads": args.threads,
                                                "seconds": totals[method], "layers": per_layer[method],
                                                "environment": environment()})
        print(f"{method}: {totals[method]:.1f} s", file=sys.stderr)
    first = args.methods[0]
    lines = [f"charlm at sparsity {args.sparsity:g}, {args.threads} threads: seconds per layer (its calibration "
             "pass included) and in total.", "",
             "| layer | d_out × d_in | " + " | ".join(args.methods) + " |", "|---|---|" + "---|" * len(args.methods)]
    for i, (name, d_out, d_in, _) in enumerate(per_layer[first]):
        short = name.replace("model.transformer.", "").replace(".weight", "")
        lines.append(f"| {short} | {d_out} × {d_in} | " +
                     " | ".join(f"{per_layer[m][i][3]:.2f}" for m in args.methods) + " |")
    lines.append("| **total** | | " + " | ".join(f"**{totals[m]:.1f}**" for m in args.methods) + " |")
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
