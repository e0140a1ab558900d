"""ToST study: plain vs ToST vs each technique alone, for random and CBS masks, trained from re-initialisation.

    OMP_NUM_THREADS=1 python scripts/tost_study.py --model mlpnet --epochs 10 --ghost-epochs 4 \
        --seeds 0 1 2 --out results/tost_study/mlpnet

Each run lives in ``OUT/runs/<mask>_s<sparsity>_<config>_seed<k>/`` (the ``engine.training.train``
folder: record.json, checkpoint.pt, model.pt), so the study resumes where it stopped: finished runs
are read back, an interrupted one continues from its last epoch. CBS masks are made once with
``engine.pruner.prune`` from the shared checkpoint and cached in ``OUT/masks/``. Random masks are
layer-wise uniform with the run's seed. Writes ``OUT/runs.jsonl`` (one line per finished run),
``OUT/table.md`` (final accuracy, mean ± std over seeds) and ``OUT/accuracy_per_epoch.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

CONFIGS = ("plain", "tost", "ghost_skip", "ghost_neurons", "rescale_init", "label_smoothing")
MASKS = ("random", "cbs")
COLORS = {"plain": "black", "tost": "tab:red", "ghost_skip": "tab:blue", "ghost_neurons": "tab:orange",
          "rescale_init": "tab:green", "label_smoothing": "tab:purple"}


def cbs_mask(model_name: str, sparsity: float, data_dir, cache: Path, settings: dict) -> dict:
    """The CBS mask of the shared checkpoint at ``sparsity`` (cached as a mask.pt state dict)."""
    import torch

    from engine.data import dataset_for_model
    from engine.models import load_model, prunable_parameters
    from engine.pruner import PruneConfig, prune
    from engine.records import atomic_write_bytes, write_json_atomic

    path = cache / f"cbs_{model_name}_s{sparsity:g}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    model = load_model(model_name, None if data_dir is None else Path(data_dir) / _ckpt(model_name))
    x, y = dataset_for_model(model_name, data_dir, "train-10k" if model_name == "resnet20" else "train")
    names = [n for n, _ in prunable_parameters(model, settings.pop("preset"))]
    t0 = time.perf_counter()
    report = prune(model, names, (x, y), PruneConfig(sparsity=sparsity, progress=False, **settings))
    masks = {k: v.cpu().bool() for k, v in report.masks.items()}
    buf = io.BytesIO()
    torch.save(masks, buf)
    atomic_write_bytes(path, buf.getvalue())
    write_json_atomic(path.with_suffix(".json"), {"model": model_name, "sparsity": sparsity, "settings": settings,
                                                 "seconds": time.perf_counter() - t0, "report": report.to_dict()})
    return masks


def _ckpt(model_name: str) -> str:
    from engine.models import DEFAULT_CHECKPOINTS

    return DEFAULT_CHECKPOINTS[model_name]


def cbs_settings(model_name: str, fast: bool) -> dict:
    """Pruner settings of the CBS masks: the paper's for MLPNet; a cheaper layer-wise one for ResNet20."""
    if model_name == "mlpnet":
        return {"method": "cbs", "fisher_samples": 10000, "damping": 1e-3, "block_mode": "whole", "preset": "default"}
    return {"method": "woodfisher" if fast else "cbs", "fisher_samples": 500, "damping": 1e-5, "block_mode": "layer",
            "preset": "cbs"}


def config_for(name: str, args) -> "object":
    from engine.training import TrainConfig

    base = {"epochs": args.epochs, "ghost_epochs": args.ghost_epochs, "lr": args.lr, "weight_decay": args.weight_decay,
            "batch_size": args.batch_size, "augment": args.model == "resnet20",
            "gradinit_iterations": args.gradinit_iterations, "gradinit_batch": args.gradinit_batch}
    if name in ("plain", "tost"):
        return lambda seed: TrainConfig.recipe(name, seed=seed, **base)
    single = {"ghost_skip": False, "ghost_neurons": False, "rescale_init": False, "label_smoothing": 0.0}
    single[name] = 0.1 if name == "label_smoothing" else True
    return lambda seed: TrainConfig(seed=seed, **base, **single)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlpnet", "resnet20"), required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.98])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ghost-epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gradinit-iterations", type=int, default=200)
    parser.add_argument("--gradinit-batch", type=int, default=64)
    parser.add_argument("--fast-cbs", action="store_true", help="ResNet20: WoodFisher layer masks instead of CBS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true", help="only rebuild table and plot from finished runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from engine.data import dataset_for_model
    from engine.models import build_model, prunable_parameters
    from engine.sparse_masks import make_mask
    from engine.train_cli import MODEL_DEFAULTS, TRAIN_SPLIT
    from engine.training import train

    torch.set_num_threads(args.threads)
    args.lr = args.lr if args.lr is not None else MODEL_DEFAULTS[args.model]["lr"]
    args.weight_decay = args.weight_decay if args.weight_decay is not None else MODEL_DEFAULTS[args.model]["weight_decay"]
    out: Path = args.out
    if not args.report_only:
        train_data = dataset_for_model(args.model, args.data_dir, TRAIN_SPLIT.get(args.model, "train"))
        test_data = dataset_for_model(args.model, args.data_dir, "test")
        preset = cbs_settings(args.model, args.fast_cbs)["preset"]
        for mask_name in args.masks:
            for sparsity in args.sparsities:
                fixed = None
                if mask_name == "cbs":
                    fixed = cbs_mask(args.model, sparsity, args.data_dir, out / "masks",
                                     cbs_settings(args.model, args.fast_cbs))
                for config_name in args.configs:
                    make_config = config_for(config_name, args)
                    for seed in args.seeds:
                        run = out / "runs" / f"{mask_name}_s{sparsity:g}_{config_name}_seed{seed}"
                        model = build_model(args.model, seed=seed)
                        if fixed is None:
                            names = [n for n, _ in prunable_parameters(model, preset)]
                            masks = make_mask(model, names, "random", sparsity, scope="layerwise", seed=seed)
                        else:
                            masks = fixed
                        t0 = time.perf_counter()
                        rec = train(model, masks, train_data, test_data, make_config(seed), out=run, resume=True,
                                    show_progress=False,
                                    metadata={"model": args.model, "mask": mask_name, "sparsity": sparsity,
                                              "config_name": config_name, "seed": seed, "init": "reinit"})
                        print(f"{run.name}: final {rec['final_accuracy']:.2f} %  ({time.perf_counter() - t0:.0f} s)",
                              flush=True)
    paths = write_report(out, args.model)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def write_report(out: Path, model_name: str) -> list[Path]:
    """runs.jsonl, table.md and accuracy_per_epoch.png from every finished run under ``out/runs``."""
    from engine.records import atomic_write_bytes

    records = []
    for path in sorted((out / "runs").glob("*/record.json")):
        rec = json.loads(path.read_text())
        if rec.get("finished"):
            rec.pop("environment", None)
            records.append(rec)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_bytes(out / "runs.jsonl", lines.encode())
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["mask"], r["sparsity"], r["config_name"]), []).append(r)
    configs = [c for c in CONFIGS if any(k[2] == c for k in groups)]
    cells = sorted({(k[0], k[1]) for k in groups}, key=lambda t: (MASKS.index(t[0]), t[1]))

    def fmt(rs: list[dict]) -> str:
        accs = [r["final_accuracy"] for r in rs]
        if len(accs) == 1:
            return f"{accs[0]:.2f}"
        return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"

    header = "| mask | sparsity | " + " | ".join(configs) + " | ToST − plain |"
    rows = [header, "|" + "---|" * (len(configs) + 3)]
    for mask, sp in cells:
        vals = [fmt(groups[(mask, sp, c)]) if (mask, sp, c) in groups else "–" for c in configs]
        gain = "–"
        if (mask, sp, "plain") in groups and (mask, sp, "tost") in groups:
            mean = lambda c: statistics.mean(r["final_accuracy"] for r in groups[(mask, sp, c)])  # noqa: E731
            gain = f"{mean('tost') - mean('plain'):+.2f}"
        rows.append(f"| {mask} | {sp:g} | " + " | ".join(vals) + f" | {gain} |")
    seeds = sorted({r["seed"] for r in records})
    epochs = sorted({r["config"]["epochs"] for r in records})
    note = (f"\n{model_name}: final test accuracy (%) after {', '.join(map(str, epochs))} epochs from re-initialisation; "
            f"seeds {seeds} (mean ± sample std when more than one); {len(records)} finished runs.\n")
    atomic_write_bytes(out / "table.md", ("\n".join(rows) + "\n" + note).encode())
    paths = [out / "runs.jsonl", out / "table.md"]
    if records:
        paths.append(_plot(groups, cells, configs, out / "accuracy_per_epoch.png", model_name))
    return paths


def _plot(groups, cells, configs, path: Path, model_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.records import atomic_write_bytes

    cols = min(2, len(cells))
    nrows = math.ceil(len(cells) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
    for ax, (mask, sp) in zip(axes.flat, cells):
        # T of the cell from any of its runs (the last config need not have run in every cell)
        t = next(g[0]["ghost_phase_epochs"] for c in configs if (g := groups.get((mask, sp, c))))
        for c in configs:
            rs = groups.get((mask, sp, c))
            if not rs:
                continue
            n = min(len(r["history"]) for r in rs)
            mean = [statistics.mean(r["history"][e]["test_accuracy"] for r in rs) for e in range(n)]
            style = {"color": COLORS[c], "linewidth": 2 if c in ("plain", "tost") else 1}
            ax.plot(range(1, n + 1), mean, marker="o", markersize=3, label=c, **style)
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{model_name}, {mask} mask, sparsity {sp:g} (T = {t})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


if __name__ == "__main__":
    sys.exit(main())
