"""One-shot pruning sweep of a zoo model over methods × sparsities, with published numbers beside ours.

    python scripts/oneshot_sweep.py --model mlpnet --fisher-samples 10000 --damping 1e-3 --block-mode whole \
        --methods magnitude magnitude+update woodfisher woodfisher-noupdate cbs \
        --sparsities 0.5 0.7 0.8 0.9 0.95 0.98 --out results/mlpnet_oneshot

Writes ``OUT/records.jsonl`` (one line per run, appended as each run ends: re-running the same command
skips what is done, so an interrupted sweep resumes), ``OUT/table.md`` and ``OUT/accuracy.png``, and
prints where it wrote them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.pipeline import PruneJob, run_prune
from engine.plots import accuracy_plot
from engine.pruner import PruneConfig
from engine.published import PUBLISHED
from engine.records import append_jsonl, atomic_write_bytes

#: label -> (method, update)
VARIANTS = {
    "magnitude": ("magnitude", False),
    "magnitude+update": ("magnitude", True),
    "woodfisher": ("woodfisher", True),
    "woodfisher-noupdate": ("woodfisher", False),
    "greedy": ("greedy", True),
    "iht": ("iht", True),
    "cbs": ("cbs", True),
    "cbs-noupdate": ("cbs", False),
}


def _key(r: dict) -> tuple:
    return (r["label"], round(r["sparsity"], 6), r["seed"])


def _table(rows: list[dict], model: str, sparsities: list[float]) -> str:
    head = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (len(sparsities) + 1)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = []
        for s in sparsities:
            hit = [r for r in rows if r["label"] == label and abs(r["sparsity"] - s) < 1e-9]
            cells.append(f"{hit[0]['accuracy']:.2f} ({hit[0]['prune_seconds']:.0f} s)" if hit else "–")
        lines.append(f"| {label} (ours) | " + " | ".join(cells) + " |")
    for name, curve in PUBLISHED[model].items():
        if name == "dense":
            continue
        lines.append(f"| {name} | " + " | ".join(f"{curve[s]:.2f}" if s in curve else "–" for s in sparsities) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PUBLISHED), required=True)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "magnitude+update", "woodfisher", "cbs"],
                    choices=sorted(VARIANTS))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--fisher-samples", type=int, default=10000)
    ap.add_argument("--fisher-batch", type=int, default=1)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--block-mode", default="whole")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--bn-reestimate", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--loss-samples", type=int, default=None, help="samples scoring cbs masks (default: Fisher samples)")
    ap.add_argument("--evaluate-update", action="store_true", help="cbs scores masks after the CBS-U update")
    ap.add_argument("--tag", default="", help="suffix of the method labels in the table (e.g. a variant name)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="solver parameter for cbs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}
    records = args.out / "records.jsonl"
    done = {}
    if records.exists():
        for line in records.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    for label in args.methods:
        method, update = VARIANTS[label]
        for s in args.sparsities:
            for seed in args.seeds:
                if (label + args.tag, round(s, 6), seed) in done:
                    continue
                config = PruneConfig(
                    sparsity=s, method=method, update=update, fisher_samples=args.fisher_samples,
                    fisher_batch=args.fisher_batch, damping=args.damping, block_mode=args.block_mode,
                    block_size=args.block_size, seed=seed, solver_params=params if method == "cbs" else {},
                    loss_samples=args.loss_samples if method == "cbs" else None,
                    evaluate_update=args.evaluate_update and method == "cbs",
                )
                job = PruneJob(model=args.model, config=config, data_dir=args.data_dir, preset=args.preset,
                               bn_reestimate=args.bn_reestimate)
                rec = run_prune(job)
                rec["label"] = label + args.tag
                append_jsonl(records, rec)
                done[_key(rec)] = rec
                print(f"{label:>20} s={s:<5} seed={seed} acc={rec['accuracy']:.2f} "
                      f"prune={rec['prune_seconds']:.1f}s peak={rec['peak_memory_mb']:.0f}MiB", flush=True)
    rows = list(done.values())
    table = _table(rows, args.model, sorted(set(args.sparsities)))
    atomic_write_bytes(args.out / "table.md", (table + "\n").encode())
    refs = {k: v for k, v in PUBLISHED[args.model].items() if k.startswith("CBS")}
    accuracy_plot(rows, args.out / "accuracy.png", f"One-shot pruning of {args.model} (no fine-tuning)",
                  references=refs, dense=PUBLISHED[args.model]["dense"], suffix=" (ours)")
    print(table)
    print(f"wrote {records}, {args.out / 'table.md'}, {args.out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
