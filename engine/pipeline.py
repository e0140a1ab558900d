"""End-to-end runs on the model zoo: load, measure, prune, measure again, record.

Used by ``cbs prune`` and by the scripts; everything here is also reachable piece by piece through
:mod:`engine.pruner`, :mod:`engine.models`, :mod:`engine.data` and :mod:`engine.evaluate`.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import augment_cifar10, dataset_for_model, default_data_dir
from .errors import DataNotFoundError, invalid_option
from .evaluate import evaluate, reestimate_batchnorm
from .models import MODEL_NAMES, load_model, prunable_parameters
from .pruner import PruneConfig, check_prune_inputs, prune
from .masking import make_permanent
from .records import atomic_write_bytes, environment, write_json_atomic

__all__ = ["PruneJob", "run_prune", "default_checkpoint", "CHECKPOINTS", "peak_memory_mb", "save_tensors", "bn_images", "stage_hook"]

#: checkpoint file of each model, relative to the data folder (laid out like ../shared/data)
CHECKPOINTS = {
    "mlpnet": "weights/woodfisher_mlpnet_mnist_25_epoch_93.97.ckpt",
    "resnet20": "weights/woodfisher_resnet20_cifar10.pth.tar",
}


#: files each model's run reads from the data folder (checked before any work starts)
DATA_FILES = {
    "mlpnet": [f"mnist/{split}-{kind}-idx{d}-ubyte.gz" for split in ("train", "t10k")
               for kind, d in (("images", 3), ("labels", 1))],
    "resnet20": ["cifar10/cifar10_train_10k.npz", "cifar10/cifar10_test.npz"],
}


def default_checkpoint(model: str, data_dir: str | Path) -> Path:
    """The shared checkpoint of ``model`` inside ``data_dir``."""
    return Path(data_dir) / CHECKPOINTS[model]


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class PruneJob:
    """A pruning run on a model of the zoo (validated on construction: nothing heavy happens before)."""

    model: str
    config: PruneConfig
    data_dir: Path | None = None
    checkpoint: Path | None = None
    preset: str = "default"
    bn_reestimate: bool = False
    bn_samples: int = 10000
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise invalid_option("model", "PruneJob", f"one of {', '.join(MODEL_NAMES)}", repr(self.model))
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else default_data_dir()
        if not self.data_dir.is_dir():
            raise DataNotFoundError(
                f"The data folder {self.data_dir} does not exist. Pass --data-dir (a folder laid out like ../shared/data, "
                "with mnist/, cifar10/ and weights/ inside)."
            )
        self.checkpoint = Path(self.checkpoint) if self.checkpoint is not None else default_checkpoint(self.model, self.data_dir)
        if not self.checkpoint.is_file():
            raise DataNotFoundError(f"The checkpoint {self.checkpoint} does not exist. Pass --checkpoint PATH.")
        needed = [self.data_dir / f for f in DATA_FILES[self.model]]
        absent = [str(f) for f in needed if not f.is_file()]
        if absent:
            raise DataNotFoundError(
                f"The data folder {self.data_dir} lacks the {self.model} data: {', '.join(absent)} not found. "
                "Pass --data-dir (a folder laid out like ../shared/data)."
            )
        if self.bn_samples < 1:
            raise invalid_option("bn_samples", "PruneJob", "an integer >= 1", self.bn_samples)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """``torch.save`` of a dict of tensors, written atomically (a crash leaves the old file or none)."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def bn_images(job: PruneJob, train_x: torch.Tensor, seed: int) -> torch.Tensor:
    """Training images for BatchNorm re-estimation (augmented for ResNet20, whose statistics came from
    augmented images: clean ones cost ~3 points)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(train_x.shape[0], generator=gen)[: job.bn_samples]
    images = train_x[idx]
    if job.model == "resnet20":
        images = augment_cifar10(images, copies=2, seed=seed)
    return images


def stage_hook(job: PruneJob, train_x: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               test_every_stage: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """The ``on_stage`` callback of :func:`engine.pruner.prune` for a job, and the list it fills.

    After every stage but the last it re-estimates BatchNorm (with ``job.bn_reestimate``, on
    :func:`bn_images` of a per-stage seed) and, with ``test_every_stage``, appends the stage's test
    accuracy and loss to the list (one dict per stage)."""
    log: list[dict[str, Any]] = []

    def on_stage(stage, staged_model) -> None:
        if job.bn_reestimate:
            reestimate_batchnorm(staged_model, bn_images(job, train_x, job.config.seed + stage.stage),
                                 seed=job.config.seed)
        entry: dict[str, Any] = {"stage": stage.stage, "sparsity": stage.sparsity, "step": stage.step}
        if test_every_stage:
            entry["accuracy"], entry["test_loss"] = evaluate(staged_model, test_x, test_y)
        log.append(entry)

    return on_stage, log


def run_prune(job: PruneJob, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load the model (unless the caller already loaded ``job.checkpoint`` into ``model``) and the data,
    prune, evaluate before/after, write ``job.out/record.json`` (and ``mask.pt``, ``model.pt``); return
    the record.

    ``mask.pt``: {parameter name: 0/1 bool tensor of the parameter's shape}, the mask the pruner chose
    (``cbs train --mask FILE`` reads it). ``model.pt``: the pruned model's plain state_dict (masks folded
    in, so it loads into the unpruned model class). With several stages and ``bn_reestimate``, BatchNorm
    statistics are re-estimated after every stage too, so the next stage's gradients see them."""
    started = time.time()
    if model is None:
        model = load_model(job.model, job.checkpoint)
    names = [n for n, _ in prunable_parameters(model, job.preset)]
    train_x, train_y = dataset_for_model(job.model, job.data_dir, "train")
    test_x, test_y = dataset_for_model(job.model, job.data_dir, "test")
    check_prune_inputs(model, names, int(train_x.shape[0]), job.config)  # bad settings: fail before any work
    dense_acc, dense_loss = evaluate(model, test_x, test_y)
    on_stage, stage_log = stage_hook(job, train_x, test_x, test_y)
    report = prune(model, names, train_x, train_y, job.config, on_stage=on_stage if job.config.stages > 1 else None)
    acc, loss = evaluate(model, test_x, test_y)
    record: dict[str, Any] = {
        "model": job.model,
        "checkpoint": str(job.checkpoint),
        "data_dir": str(job.data_dir),
        "preset": job.preset,
        "method": job.config.method_name,
        "update": job.config.applies_update,
        "sparsity": job.config.sparsity,
        "achieved_sparsity": report.achieved_sparsity,
        "dense_accuracy": dense_acc,
        "dense_test_loss": dense_loss,
        "accuracy": acc,
        "test_loss": loss,
        "fisher_seconds": report.fisher_seconds,
        "prune_seconds": report.prune_seconds,
        "select_seconds": report.select_seconds,
        "update_seconds": report.update_seconds,
        "seed": job.config.seed,
        "settings": job.config.to_dict(),
    }
    if job.bn_reestimate:
        images = bn_images(job, train_x, job.config.seed)
        reestimate_batchnorm(model, images, seed=job.config.seed)
        record["accuracy_no_bn_reestimate"] = acc
        record["test_loss_no_bn_reestimate"] = loss
        record["accuracy"], record["test_loss"] = evaluate(model, test_x, test_y)
        record["bn_reestimate_samples"] = int(min(job.bn_samples, train_x.shape[0]))
    record.update(
        {
            "n_total": report.n_total,
            "n_keep": report.n_keep,
            "objective_total": float(sum(b.objective for b in report.blocks)),
            "blocks": [b.__dict__ for b in report.blocks],
            "stages": [{**st.__dict__, **(stage_log[i] if i < len(stage_log) else {})}
                       for i, st in enumerate(report.stages)],
            "peak_memory_mb": peak_memory_mb(),
            "total_seconds": time.time() - started,
            "environment": environment(),
            **job.extra,
        }
    )
    if job.out is not None:
        out = Path(job.out)
        save_tensors(out / "mask.pt", {n: m for n, m in report.masks.items()})
        plain = _folded_state_dict(model)
        save_tensors(out / "model.pt", plain)
        record["files"] = {"mask": str(out / "mask.pt"), "model": str(out / "model.pt")}
        write_json_atomic(out / "record.json", record)
    return record


def _folded_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with pruning masks folded in (keys of the plain, unpruned model class),
    without touching ``model`` itself."""
    import copy

    plain = copy.deepcopy(model)
    make_permanent(plain)
    return plain.state_dict()
