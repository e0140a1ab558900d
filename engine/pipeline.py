"""The whole pruning pipeline for any model: load → check → recommend → measure → prune (stages, BatchNorm
re-estimation between them, the step search) → re-estimate → measure again → record → write.

``cbs prune`` and :func:`engine.api.prune_model` are two doors to the same code: the CLI turns specs
(``FILE.py:FUNC``, zoo names) into objects (:mod:`engine.userspec`), the API takes the objects; both build a
:class:`Prepared` run with :func:`prepare` and execute it with :func:`execute`.
"""

from __future__ import annotations

import io
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .config import PruneConfig, stage_schedule
from .data import fast_layout
from .errors import InvalidOptionError, invalid_option
from .evaluate import eval_mode, reestimate_batchnorm_batches
from .losses import batch_loss_sum, cross_entropy, top1_accuracy
from .masking import make_permanent
from .params import select_parameters
from .progress import get_logger, progress
from .pruner import check_prune_inputs, prune
from .recommend import PAPER, Profile, as_dict, describe, profile_of, recommend
from .reconstruction import check_reconstruction_inputs, prune_reconstruction
from .records import environment, to_jsonable, write_folder_atomic
from .resume import MARKER, Book, open_book
from .settings import PRUNE_OPTIONS, option
from .sources import Samples, as_samples

__all__ = ["Prepared", "BatchNormPlan", "settle", "prepare", "execute", "evaluate_samples", "peak_memory_mb", "stage_hook"]

log = get_logger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class BatchNormPlan:
    """BatchNorm re-estimation on ``samples`` training samples (default 4,000) drawn with the run's seed, streamed
    in batches of 128. ``augment="crop-flip"``: two copies of each sample, each a random crop of the image padded by 4 pixels
    of the data's own black level (the per-channel minimum of the drawn samples, so the user's normalisation
    is respected), flipped with probability ½: how CIFAR-style networks saw their data in training."""

    samples: int = option("bn_samples").default
    augment: str = "none"

    def __post_init__(self) -> None:
        from .settings import option

        option("bn_samples").check(self.samples, "BatchNormPlan")
        option("bn_augment").check(self.augment, "BatchNormPlan")

    def reestimate(self, model: nn.Module, train: Samples, seed: int, show: bool | None = None) -> int:
        """Recompute every BatchNorm layer's statistics; the number of layers (0: none, nothing done)."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return 0
        count = min(self.samples, len(train))
        drawn = train.draw(count, seed, "bn_samples")
        if self.augment == "none":
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
            batches = (drawn.source.take(drawn.index[order[s : s + 128]])[0] for s in range(0, count, 128))
            return reestimate_batchnorm_batches(model, progress(batches, total=-(-count // 128), desc="BatchNorm",
                                                                enabled=show))
        from .data import crop_flip, crop_flip_plan

        black = None
        for x, _ in drawn.batches(1000):  # the data's black level, per channel
            low = x.transpose(0, 1).reshape(x.shape[1], -1).min(dim=1).values
            black = low if black is None else torch.minimum(black, low)
        copies = 2
        plan = crop_flip_plan(count, copies=copies, seed=seed)
        order = torch.randperm(copies * count, generator=torch.Generator().manual_seed(seed))

        def batches():
            for s in range(0, copies * count, 128):
                rows = order[s : s + 128]
                images = drawn.source.take(drawn.index[rows % count])[0]
                yield crop_flip(images, plan, rows, black)

        return reestimate_batchnorm_batches(model, progress(batches(), total=-(-copies * count // 128),
                                                            desc="BatchNorm", enabled=show))


def evaluate_samples(model: nn.Module, data: Samples, loss: Callable = cross_entropy,
                     metric: Callable = top1_accuracy, batch: int = 100, show: bool | None = None) -> tuple[float, float]:
    """(metric, loss) of ``model`` on ``data``, means over samples, in eval mode without gradients. The default
    loss and metric over tensors give exactly :func:`engine.evaluate.evaluate`'s figures."""
    if data.tensors is not None and loss is cross_entropy and metric is top1_accuracy:
        from .evaluate import evaluate

        return evaluate(model, *data.tensors, batch_size=batch)
    total_loss, total_metric, count = 0.0, 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in progress(data.batches(batch), desc=f"evaluate ({data.name})", enabled=show):
            out = model(fast_layout(x))
            total_loss += batch_loss_sum(loss, out, y)
            total_metric += float(metric(out, y)) * out.shape[0]
            count += out.shape[0]
    return total_metric / max(count, 1), total_loss / max(count, 1)


def stage_hook(bn: BatchNormPlan | None, train: Samples, test: Samples | None, seed: int, loss: Callable = cross_entropy,
               metric: Callable = top1_accuracy, test_every_stage: bool = True,
               show: bool | None = False) -> tuple[Callable, list[dict]]:
    """The ``on_stage`` callback of :func:`engine.pruner.prune` and the list it fills: after every stage but the
    last it re-estimates BatchNorm (with ``bn``, on a per-stage seed) and, with ``test_every_stage``, appends
    the stage's test metric and loss."""
    log_: list[dict[str, Any]] = []

    def on_stage(stage, staged_model) -> None:
        if bn is not None:
            bn.reestimate(staged_model, train, seed + stage.stage, show)
        entry: dict[str, Any] = {"stage": stage.stage, "sparsity": stage.sparsity, "step": stage.step}
        if test_every_stage and test is not None:
            entry["accuracy"], entry["test_loss"] = evaluate_samples(staged_model, test, loss, metric)
        log_.append(entry)

    return on_stage, log_


@dataclass
class Prepared:
    """A checked run, ready to execute: nothing heavy has happened yet."""

    model: nn.Module
    names: list[str]
    transposed: frozenset[str]
    train: Samples
    test: Samples | None
    config: PruneConfig
    bn: BatchNormPlan | None
    loss: Callable = cross_entropy
    metric: Callable = top1_accuracy
    describe: dict[str, Any] = field(default_factory=dict)  # what the record says about the inputs
    chosen: str = ""  # the recommendation in flag form (what cbs prune says on stderr)
    stage_test: bool = True  # the test metric after every stage (records only: it changes no result)


def settle(profile: Profile, sparsity: float, settings: dict[str, Any], transposed: bool = False,
           bn_reestimate: bool | None = None) -> tuple[dict[str, Any], bool, str]:
    """The run's PruneConfig keywords (all but ``sparsity``), whether it re-estimates BatchNorm and how it augments
    the BatchNorm samples: the recommendation for ``profile`` at ``sparsity`` with ``settings`` (the user's) over
    it. ``transposed``: some pruned weight is stored transposed (N:M groups then run down rows). The one place
    that turns a profile and the user's settings into a run's settings (:func:`prepare`, and
    ``scripts/reproduce.py`` for the zoo models without loading them)."""
    rec = recommend(profile, sparsity, settings.get("method"), settings.get("objective"), settings)
    # a layer-wise recommendation is one pass whose settings are recommend's own
    if rec.get("objective") != "reconstruction" and settings.get("pattern") not in (None, "unstructured"):
        # N:M on the Fisher objective: one pass (the groups fix every block's count), rows as blocks when a
        # weight is stored transposed (its groups run down the stored columns)
        rec.update(stages=1, allocation="uniform", **({"block_mode": "row"} if transposed else {}))
        rec.pop("warm_start", None)
    rec_bn, rec_augment = rec.pop("bn_reestimate"), rec.pop("bn_augment")
    if bn_reestimate is None:
        bn_reestimate = rec_bn
    if not bn_reestimate and "step_search_bn" not in settings:
        rec["step_search_bn"] = False
    return {**rec, **settings}, bool(bn_reestimate), rec_augment


def prepare(model: nn.Module, train: Any, test: Any = None, *, sparsity: float, settings: dict[str, Any] | None = None,
            params: str | list[str] | None = None, loss: Callable = cross_entropy, metric: Callable = top1_accuracy,
            bn_reestimate: bool | None = None, bn_samples: int = option("bn_samples").default,
            bn_augment: str | None = None, stage_test: bool = option("stage_test").default,
            describe_inputs: dict[str, Any] | None = None) -> Prepared:
    """Check everything and settle the settings: the recommendation for this model and data (:mod:`engine.
    recommend`), then ``settings`` (the user's PruneConfig keywords) over it. Raises a clear error on any bad
    input before any work. ``stage_test=False`` skips the test pass after every stage (the record's per-stage
    accuracy; nothing else changes)."""
    option("stage_test").check(stage_test, "prepare()")
    settings = dict(settings or {})
    unknown = [k for k in settings if k not in {o.name for o in PRUNE_OPTIONS}]
    if unknown:
        raise invalid_option(unknown[0], "prune_model()", "a PruneConfig setting "
                             f"({', '.join(o.name for o in PRUNE_OPTIONS[:6])}, ...)", repr(settings[unknown[0]]))
    train, test = as_samples(train, "train"), None if test is None else as_samples(test, "test")
    if isinstance(params, (list, tuple)):
        names, transposed = list(params), select_parameters(model)[1]
    else:
        names, transposed = select_parameters(model, params)
    x, _ = train.first()
    profile = profile_of(model, names, len(train), x.ndim)
    preset = PAPER[profile.kind].get("params")
    if settings.get("method") == "cbs" and params is None and preset is not None:
        try:  # the paper's method prunes the paper's parameters where the model has that preset (ResNet20)
            names, transposed = select_parameters(model, preset)
            profile = profile_of(model, names, len(train), x.ndim)
        except InvalidOptionError:
            pass
    merged, bn_reestimate, rec_augment = settle(profile, sparsity, settings, bool(set(names) & set(transposed)),
                                                bn_reestimate)
    config = PruneConfig(sparsity=sparsity, **merged)
    if config.objective == "reconstruction":
        check_reconstruction_inputs(model, names, len(train), config)
    else:
        check_prune_inputs(model, names, len(train), config, transposed)
    bn = BatchNormPlan(bn_samples, bn_augment or rec_augment) if bn_reestimate else None
    chosen = describe({**config.to_dict(), "bn_reestimate": bool(bn_reestimate)},
                      given={k: getattr(config, k) for k in settings})
    info = {**(describe_inputs or {}), "profile": as_dict(profile), "parameters": names,
            "transposed_parameters": sorted(transposed),
            "bn_reestimate": bool(bn_reestimate), "bn_augment": None if bn is None else bn.augment,
            "bn_samples": None if bn is None else min(bn_samples, len(train))}
    return Prepared(model, names, frozenset(transposed), train, test, config, bn, loss, metric, info, chosen,
                    stage_test)


def execute(run: Prepared, out: str | None = None, cache: dict | None = None,
            resume: bool | Book = False, dense: tuple[float, float] | None = None) -> dict[str, Any]:
    """Measure, prune, re-estimate, measure again; the record (also written with ``mask.pt``, ``model.pt`` and
    the finished marker ``checkpoint.pt`` into ``out`` as one transaction when given). With ``out``, a
    multi-stage or layer-wise run replaces ``out`` with a checkpoint after every stage or layer
    (:mod:`engine.resume`); ``resume=True`` continues the run in ``out`` from its last one (a finished run
    returns its record without work), or takes the :class:`~engine.resume.Book` the caller opened already.
    ``dense``: the dense model's (metric, loss) on ``run.test`` when the caller measured it already (a sweep
    measures it once for all its runs)."""
    started = time.time()
    config, show = run.config, run.config.progress
    book = resume if isinstance(resume, Book) else open_book(run, out, resume)  # refuses a changed run now
    if book.finished:
        return book.finish()
    if book.saved is not None:
        dense = book.dense  # measured before the interruption, on the dense model
    elif dense is None:
        dense = evaluate_samples(run.model, run.test, run.loss, run.metric, show=show) if run.test is not None else None
    on_stage, stage_log = stage_hook(run.bn, run.train, run.test, config.seed, run.loss, run.metric,
                                     test_every_stage=run.stage_test, show=show)
    stage_log.extend(book.stage_log)
    book.dense, book.stage_log = dense, stage_log
    saving = out is not None
    if config.objective == "reconstruction":
        report = prune_reconstruction(run.model, run.names, run.train, config, resume_from=book.layers(),
                                      on_progress=book.on_layer if saving else None)
    else:
        staged = len(stage_schedule(config)) > 1
        report = prune(run.model, run.names, run.train, config, loss=run.loss, transposed=run.transposed,
                       on_stage=on_stage if staged else None, cache=cache, resume_from=book.stages(),
                       on_progress=book.on_stage if saving and staged else None)
    record: dict[str, Any] = {**run.describe, "method": config.method_name, "update": config.applies_update,
                              "sparsity": config.sparsity, "achieved_sparsity": report.achieved_sparsity,
                              "recommendation": run.chosen}
    after = evaluate_samples(run.model, run.test, run.loss, run.metric, show=show) if run.test is not None else None
    if run.bn is not None:
        run.bn.reestimate(run.model, run.train, config.seed, show)
        if after is not None:
            record["accuracy_no_bn_reestimate"], record["test_loss_no_bn_reestimate"] = after
            after = evaluate_samples(run.model, run.test, run.loss, run.metric, show=show)
    if dense is not None:
        record["dense_accuracy"], record["dense_test_loss"] = dense
        record["accuracy"], record["test_loss"] = after
    objectives = [b.objective for b in report.blocks]
    record.update({
        "fisher_seconds": report.fisher_seconds, "prune_seconds": report.prune_seconds,
        "select_seconds": report.select_seconds, "update_seconds": report.update_seconds,
        "seed": config.seed, "settings": config.to_dict(),
        "n_total": report.n_total, "n_keep": report.n_keep,
        "objective_total": None if None in objectives else float(sum(objectives)),
        "blocks": [b.__dict__ for b in report.blocks],
        "stages": [{**st.__dict__, **(stage_log[i] if i < len(stage_log) else {})}
                   for i, st in enumerate(report.stages)],
        "peak_memory_mb": peak_memory_mb(), "total_seconds": time.time() - started + book.before,
        "environment": environment(),
        "command": sys.argv[:],
    })
    if out is not None:
        import json

        record["files"] = {"mask": "mask.pt", "model": "model.pt", "record": "record.json", "resume": MARKER}
        plain = _folded_state_dict(run.model)
        write_folder_atomic(out, {"mask.pt": _tensor_bytes(report.masks), "model.pt": _tensor_bytes(plain),
                                  "record.json": (json.dumps(to_jsonable(record), indent=2) + "\n").encode(),
                                  **book.final_files(record)})
    return record


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def _folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with pruning masks folded in (keys of the plain, unpruned model class), without
    touching ``model`` itself."""
    import copy

    from torch.nn.utils import prune as torch_prune

    with torch.no_grad():  # masked weights as plain tensors: one computed with autograd (no forward since the
        for module in model.modules():  # masks were attached, e.g. no test data) cannot be deep-copied
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, torch_prune.BasePruningMethod):
                    hook(module, None)
    plain = copy.deepcopy(model)
    make_permanent(plain)
    return plain.state_dict()
