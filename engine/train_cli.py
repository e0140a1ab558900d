"""The ``cbs train`` sub-command: train a fixed sparse mask, plain or with the ToST recipe.

    cbs train --model mlpnet --mask random --sparsity 0.9 --recipe tost --epochs 10 --out results/train/run1
    cbs train --model resnet20 --mask results/prune/mask.pt --recipe plain --init checkpoint --epochs 5 --out DIR

Writes ``DIR/record.json`` (accuracy per epoch, final accuracy, achieved sparsity, parameter count),
``DIR/model.pt`` (the plain state dict), ``DIR/mask.pt`` and ``DIR/checkpoint.pt`` (for ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import invalid_option

if TYPE_CHECKING:
    from .train_config import TrainConfig

__all__ = ["add_train_parser", "cmd_train", "MODEL_DEFAULTS"]


def _sha1(path: Path) -> str:
    """The content hash of a checkpoint (a resumed run must fine-tune / rank the same weights)."""
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

#: SGD defaults per model (lr, weight decay, batch size), used when the flags are not given.
#: the training split of each model (engine.data): ResNet20 trains on CIFAR-10's 10,000-image subset on a CPU
TRAIN_SPLIT: dict[str, str] = {"resnet20": "train-10k"}

MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    "mlpnet": {"lr": 0.05, "weight_decay": 1e-4, "batch_size": 128},
    "resnet20": {"lr": 0.1, "weight_decay": 5e-4, "batch_size": 128},
}


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``cbs train`` on the sub-parsers of ``cbs``; returns its parser."""
    from .cli import NONNEG_INT, POSITIVE, POSITIVE_INT, SPARSITY, _existing_dir, _existing_file, number_type
    from .ghost import SOFT_ACTIVATIONS
    from .models import MODEL_NAMES, PRUNABLE_PRESETS
    from .sparse_masks import MASK_SOURCES, SCOPES
    from .training import RECIPES

    unit = number_type(float, 0.0, 1.0, high_open=True, what="a number in [0, 1)")
    at_least_one = number_type(float, 1.0, what="a number >= 1")
    tr = subparsers.add_parser("train", help="train a sparse mask (random, magnitude, snip, grasp, synflow or a "
                               "mask file) with plain SGD or the ToST recipe")
    tr.add_argument("--model", required=True, choices=MODEL_NAMES)
    tr.add_argument("--data-dir", type=_existing_dir, default=None,
                    help="folder laid out like ../shared/data (mnist/, cifar10/, weights/); default ../shared/data")
    tr.add_argument("--mask", required=True, metavar="{" + ",".join(MASK_SOURCES) + ",FILE}",
                    help="a score to prune by at --sparsity, or a mask file (state dict of 0/1 tensors, e.g. the "
                    "mask.pt of cbs prune)")
    tr.add_argument("--sparsity", type=SPARSITY, default=None,
                    help="fraction of the masked weights removed, in [0, 1) (required unless --mask is a file)")
    tr.add_argument("--scope", choices=SCOPES, default="global", help="select by score globally or per layer")
    tr.add_argument("--preset", choices=PRUNABLE_PRESETS, default="default",
                    help="weights a generated mask covers: default (all conv/linear), cbs or chita (ResNet20)")
    tr.add_argument("--mask-samples", type=POSITIVE_INT, default=1000,
                    help="training samples scored by snip/grasp (at most the training set's size)")
    tr.add_argument("--synflow-rounds", type=POSITIVE_INT, default=100)
    tr.add_argument("--recipe", choices=RECIPES, default="plain",
                    help="plain: SGD + cosine; tost: all four techniques on (each can be switched below)")
    bool_flag = argparse.BooleanOptionalAction
    tr.add_argument("--ghost-skip", action=bool_flag, default=None, help="ghost skip connections (ToST 1)")
    tr.add_argument("--ghost-neurons", action=bool_flag, default=None, help="ghost soft neurons (ToST 2)")
    tr.add_argument("--rescale-init", action=bool_flag, default=None, help="GradInit-style re-scaling (ToST 3)")
    tr.add_argument("--label-smoothing", action=bool_flag, default=None, help="label smoothing 0.1 (ToST 4)")
    tr.add_argument("--smoothing", type=unit, default=0.1, help="α of --label-smoothing")
    tr.add_argument("--soft-activation", choices=SOFT_ACTIVATIONS, default="silu")
    tr.add_argument("--beta-end", type=at_least_one, default=100.0, help="β of the soft neurons at epoch T")
    tr.add_argument("--ghost-epochs", type=POSITIVE_INT, default=None,
                    help="T, epochs of the ghost phase (default ceil(epochs/3)); must be <= --epochs")
    tr.add_argument("--gradinit-iterations", type=POSITIVE_INT, default=200)
    tr.add_argument("--gradinit-batch", type=POSITIVE_INT, default=64)
    tr.add_argument("--init", choices=("reinit", "checkpoint"), default="reinit",
                    help="reinit: fresh initialisation (seeded); checkpoint: fine-tune --checkpoint")
    tr.add_argument("--checkpoint", type=_existing_file, default=None,
                    help="weights for --init checkpoint and for --mask magnitude (default: the shared checkpoint)")
    tr.add_argument("--epochs", type=POSITIVE_INT, required=True)
    tr.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate (default 0.05 MLPNet, 0.1 ResNet20)")
    tr.add_argument("--momentum", type=unit, default=0.9)
    tr.add_argument("--weight-decay", type=number_type(float, 0.0, what="a number >= 0"), default=None,
                    help="default 1e-4 MLPNet, 5e-4 ResNet20")
    tr.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="default 128")
    tr.add_argument("--no-augment", action="store_true", help="ResNet20: no pad-crop-flip augmentation")
    tr.add_argument("--seed", type=NONNEG_INT, default=0)
    tr.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (default: torch's)")
    tr.add_argument("--out", required=True, metavar="DIR", help="folder for record.json, model.pt, checkpoint.pt")
    tr.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --out (its settings must be the ones it started with)")
    tr.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (e.g. a finished run)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    return tr


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``cbs train``: validate everything, build the mask, train, print a summary."""
    import torch

    from .sparse_masks import MASK_SOURCES
    from .training import TrainConfig

    where = "cbs train"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    is_file = args.mask not in MASK_SOURCES
    if is_file and not Path(args.mask).is_file():
        raise invalid_option("--mask", where, f"one of {', '.join(MASK_SOURCES)} or an existing mask file",
                             repr(args.mask))
    if not is_file and args.sparsity is None:
        raise invalid_option("--sparsity", where, f"given (in [0, 1)) with --mask {args.mask}", "none")
    defaults = MODEL_DEFAULTS[args.model]
    overrides = {
        "epochs": args.epochs, "lr": args.lr if args.lr is not None else defaults["lr"],
        "weight_decay": args.weight_decay if args.weight_decay is not None else defaults["weight_decay"],
        "batch_size": args.batch_size if args.batch_size is not None else defaults["batch_size"],
        "momentum": args.momentum, "ghost_epochs": args.ghost_epochs, "soft_activation": args.soft_activation,
        "beta_end": args.beta_end, "gradinit_iterations": args.gradinit_iterations,
        "gradinit_batch": args.gradinit_batch, "augment": args.model == "resnet20" and not args.no_augment,
        "seed": args.seed,
    }
    for flag in ("ghost_skip", "ghost_neurons", "rescale_init"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.label_smoothing is not None:
        overrides["label_smoothing"] = args.smoothing if args.label_smoothing else 0.0
    elif args.recipe == "tost":
        overrides["label_smoothing"] = args.smoothing
    if args.ghost_epochs is not None and args.ghost_epochs > args.epochs:
        raise invalid_option("--ghost-epochs", where, f"an integer in [1, --epochs = {args.epochs}]", args.ghost_epochs)
    config = TrainConfig.recipe(args.recipe, **overrides)  # every remaining range check, before any work
    from .outdir import check_out, locked

    out = check_out(args.out, where, overwrite=args.overwrite, resume=args.resume, marker="checkpoint.pt")
    with locked(out, where):  # taken again (re-entrantly, same process) by train(); here it covers the set-up
        return _train_in(args, out, config, is_file)


def _train_in(args: argparse.Namespace, out: Path, config: TrainConfig, is_file: bool) -> int:
    import torch

    from .data import dataset_for_model, default_data_dir
    from .models import DEFAULT_CHECKPOINTS, build_model, load_model, prunable_parameters
    from .sparse_masks import load_mask_file, make_mask, mask_sparsity
    from .training import train

    where = "cbs train"
    data_dir = Path(args.data_dir) if args.data_dir is not None else default_data_dir()
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else data_dir / DEFAULT_CHECKPOINTS[args.model]
    uses_checkpoint = args.init == "checkpoint" or args.mask == "magnitude"
    model = build_model(args.model, seed=args.seed) if args.init == "reinit" else load_model(args.model, checkpoint)
    # ResNet20 trains on the 10,000-image subset: an epoch over the full 50,000 takes 5-9 min on one CPU thread
    x_train, y_train = dataset_for_model(args.model, args.data_dir, TRAIN_SPLIT.get(args.model, "train"))
    x_test, y_test = dataset_for_model(args.model, args.data_dir, "test")
    if not is_file and args.mask in ("snip", "grasp") and args.mask_samples > x_train.shape[0]:
        raise invalid_option("--mask-samples", where, f"an integer in [1, {x_train.shape[0]}] (the training set's "
                             "size)", args.mask_samples)

    if is_file:
        masks = load_mask_file(args.mask, model)
        achieved = mask_sparsity(masks)
        if args.sparsity is not None and abs(achieved - args.sparsity) > 5e-3:
            raise invalid_option("--sparsity", where, f"the mask file's sparsity ({achieved:.4f}) or not given",
                                 args.sparsity)
        source = str(args.mask)
    else:
        names = [n for n, _ in prunable_parameters(model, args.preset)]
        # magnitude ranks trained weights (the checkpoint); the at-init scores rank the network to be trained
        scored = load_model(args.model, checkpoint) if args.mask == "magnitude" else model
        rows = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.mask_samples]
        masks = make_mask(scored, names, args.mask, args.sparsity, scope=args.scope, images=x_train[rows],
                          labels=y_train[rows], seed=args.seed, synflow_rounds=args.synflow_rounds)
        source = args.mask
    # every setting that shapes the result: a resumed run must match them (train() compares them)
    meta = {"model": args.model, "mask_source": source, "sparsity": args.sparsity, "scope": args.scope,
            "preset": args.preset if not is_file else None, "recipe": args.recipe, "init": args.init,
            "data_dir": str(data_dir.resolve()),
            "checkpoint": str(checkpoint.resolve()) if uses_checkpoint else None,
            "checkpoint_sha1": _sha1(checkpoint) if uses_checkpoint else None,
            "command": "cbs " + " ".join(sys.argv[1:]) if sys.argv else None}
    record = train(model, masks, (x_train, y_train), (x_test, y_test), config, out=out, resume=args.resume,
                   overwrite=args.overwrite, show_progress=False if args.no_progress else None, metadata=meta)
    accs = " ".join(f"{h['test_accuracy']:.2f}" for h in record["history"])
    sys.stdout.write(
        f"model {args.model}  mask {source}  recipe {args.recipe} ({', '.join(config.techniques) or 'none'})  "
        f"init {args.init}\n"
        f"accuracy per epoch (%): {accs}\n"
        f"final accuracy {record['final_accuracy']:.2f} %  achieved sparsity {record['achieved_sparsity']:.4f}  "
        f"parameters {record['parameter_count']} (original {record['original_parameter_count']})\n"
        f"record: {Path(args.out) / 'record.json'}  model: {Path(args.out) / 'model.pt'}\n"
    )
    return 0
