"""Layer-wise reconstruction pruning of charlm: every method at every sparsity / pattern, validation loss, summed
reconstruction error, certified gap, seconds. Writes JSONL records (one per run; a rerun skips the ones done)
and a markdown table.

    python scripts/layerwise_study.py [--sparsities 0.5 0.6 0.7 0.8] [--patterns 2:4 4:8]
        [--methods magnitude wanda sparsegpt greedy] [--seeds 0] [--calibration 128] [--windows 200]
        [--out results/layerwise]

Calibration: ``--calibration`` training windows drawn with the seed; evaluation: ``--windows`` validation windows
of engine.charlm's protocol (all 871 with --windows 0). Needs ../shared/data (or --data-dir).
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

from engine.charlm import calibration_windows, charlm_data, evaluate_charlm, load_charlm  # noqa: E402
from engine.layerwise import prune_layerwise  # noqa: E402
from engine.params import select_parameters  # noqa: E402
from engine.records import append_jsonl, environment, read_jsonl  # noqa: E402
from engine.solvers.registry import get_solver  # noqa: E402
from formulations.patterns import parse_pattern  # noqa: E402


def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.4f}"
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.4f} ± {sd:.4f}"


def report(rows: list[dict], labels: list[str], args, dense: float) -> list[str]:
    """The markdown: validation loss per method and setting (mean ± sd over seeds, summed reconstruction
    error, seconds), "ours" (the refitted method with the lowest mean error, per setting), and ours against
    SparseGPT layer by layer and against the issue's targets."""
    def got(method, label):
        return [r for r in rows if r["method"] == method and r["setting"] == label]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Validation loss of charlm (dense {dense:.4f}; {args.windows or 871} windows), mean ± sd over "
             f"calibration seeds {seeds}; in brackets the summed layer reconstruction error and the seconds of the "
             "pruning.", "", "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for method in methods:
        cells = []
        for label in labels:
            rs = got(method, label)
            cells.append(f"{_mean_std([r['val_loss'] for r in rs])} ({mean(rs, 'error'):.3g}, "
                         f"{mean(rs, 'seconds'):.0f} s)" if rs else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ours = {}
    for label in labels:
        refits = [m for m in methods if m.endswith("+refit") and got(m, label)]
        if refits:
            ours[label] = min(refits, key=lambda m: mean(got(m, label), "error"))
    lines.append("| **ours** (lowest error) | " + " | ".join(
        f"{ours[lb]}: {_mean_std([r['val_loss'] for r in got(ours[lb], lb)])}" if lb in ours else "–"
        for lb in labels) + " |")
    lines += ["", "Ours against SparseGPT (its own weights, as published), layer by layer and against the targets "
              "(mean over seeds):", "", "| setting | ours | layers with error ≤ SparseGPT's | Σ error ours / SparseGPT "
              "| loss increase ours / SparseGPT | ours below Wanda and SparseGPT |", "|---|---|---|---|---|---|"]
    for label, method in ours.items():
        mine, theirs, wanda = got(method, label), got("sparsegpt", label), got("wanda", label)
        if not theirs:
            continue
        per_seed = [(a, b) for a in mine for b in theirs if a["seed"] == b["seed"]]
        layers_ok = sum(la["error"] <= lb["method_error"] * (1 + 1e-9) for a, b in per_seed
                        for la, lb in zip(a["layers"], b["layers"]))
        layers_all = sum(len(a["layers"]) for a, _ in per_seed)
        ratio = mean(mine, "error") / mean(theirs, "method_error")
        rise = (mean(mine, "val_loss") - dense) / (mean(theirs, "val_loss") - dense)
        below = mean(mine, "val_loss") < min(mean(theirs, "val_loss"), mean(wanda, "val_loss") if wanda else 1e9)
        lines.append(f"| {label} | {method} | {layers_ok}/{layers_all} | {ratio:.3f} | {rise:.3f} | "
                     f"{'yes' if below else 'no'} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "magnitude+refit",
                                                         "wanda+refit", "sparsegpt+refit", "greedy+refit"],
                        help="a method name: the mask with the kept weights as they are (sparsegpt: its own "
                        "weights, as published); NAME+refit: the closed-form refit of the kept weights")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "magnitude", "obs", "loss_curve"),
                        help="row budgets within a layer (recorded; methods are labelled NAME@ALLOCATION when not "
                        "uniform)")
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "layerwise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "charlm.jsonl"
    done = {(r["method"], r["setting"], r["seed"]) for r in read_jsonl(records_path)} if records_path.exists() else set()
    model, _ = load_charlm()
    train, val = charlm_data(args.data_dir)
    names, _ = select_parameters(model)
    windows = None if args.windows == 0 else args.windows
    dense = evaluate_charlm(model, val, windows=windows).loss
    settings = [(f"{s:g}", s, None) for s in args.sparsities] + [(p, None, parse_pattern(p)) for p in args.patterns]
    for seed in args.seeds:
        calibration = calibration_windows(train, args.calibration, seed)
        for label, sparsity, pattern in settings:
            for method in args.methods:
                name = method if args.allocation == "uniform" else f"{method}@{args.allocation}"
                if (name, label, seed) in done:
                    continue
                base, refit = method.removesuffix("+refit"), method.endswith("+refit")
                if pattern is not None and base != "sparsegpt" and not get_solver(base).capabilities.patterns:
                    continue  # the method cannot keep N of every M
                pruned = copy.deepcopy(model)
                start = time.perf_counter()
                _, layers = prune_layerwise(pruned, names, calibration, sparsity=sparsity, pattern=pattern,
                                            method=base, refit=refit,
                                            allocation=args.allocation if pattern is None else "uniform")
                seconds = time.perf_counter() - start
                score = evaluate_charlm(pruned, val, windows=windows)
                gaps = [r.gap for r in layers if r.gap is not None]
                record = {"method": name, "allocation": args.allocation, "setting": label, "seed": seed, "val_loss": score.loss,
                          "perplexity": score.perplexity, "dense_val_loss": dense, "seconds": seconds,
                          "error": sum(r.error for r in layers),
                          "method_error": (sum(r.method_error for r in layers)
                                           if all(r.method_error is not None for r in layers) else None),
                          "max_gap": max(gaps) if gaps else None,
                          "rows_proven": sum(r.rows_proven * r.d_out for r in layers) / sum(r.d_out for r in layers),
                          "layers": [r.__dict__ for r in layers], "calibration": args.calibration,
                          "windows": args.windows, "environment": environment()}
                append_jsonl(records_path, record)
                print(f"seed {seed} {label:>5} {method:<10} val {score.loss:.4f} (dense {dense:.4f}) "
                      f"error {record['error']:.4g} {seconds:.1f} s", file=sys.stderr)
    rows = [{**r, "method": r["method"].split("@")[0]} for r in read_jsonl(records_path)
            if r["seed"] in args.seeds and r.get("allocation", "uniform") == args.allocation]
    lines = report(rows, [s[0] for s in settings], args, dense)
    (args.out / "charlm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {records_path} and {args.out / 'charlm.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
