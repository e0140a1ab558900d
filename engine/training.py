"""Sparse training with a fixed mask: plain SGD, or the ToST recipe (Jaiswal et al., ICML 2022).

The mask M (bool, per parameter; True = kept) is fixed for the whole run. Masked weights stay exactly
zero: they are zeroed at the start, their gradients are multiplied by M before each step, and M is
re-applied after each optimizer step (momentum and weight decay would otherwise move them).

**Plain**: SGD with momentum, weight decay, a cosine learning-rate schedule stepped per batch
(lr_t = ½ lr (1 + cos(π t / (E · steps per epoch)))), cross-entropy loss.

**ToST** adds four techniques, each switchable on its own (:class:`TrainConfig`):

1. ``ghost_skip``: ghost skip branches (:class:`engine.ghost.GhostSkip`), scale 1 − p decaying to 0 over
   the first T = ``ghost_epochs`` epochs (p = step / (T · steps per epoch)), then removed. Ghost
   parameters are trained by their own SGD (same schedule) and dropped with the branches.
2. ``ghost_neurons``: every ReLU replaced by φ(βx)/β (:class:`engine.ghost.SoftNeurons`, SiLU by
   default), β rising from 1 to ``beta_end`` over the same T epochs, then ReLU again.
3. ``rescale_init``: GradInit-style layer-wise re-scaling (:func:`rescale_init`) of the masked network.
4. ``label_smoothing``: α = 0.1 on the training loss (the test loss is plain cross-entropy).

After the run the network is exactly the original architecture (same module tree, same parameter
count) with ReLU activations, so ``model.pt`` loads into the plain model class.

Resumable: with ``out``, a checkpoint (model, optimizers, schedulers, ghost state, RNG state, epoch,
history) is written atomically after every epoch; ``resume=True`` continues from it. Batch order and
augmentation are drawn from generators seeded by (seed, epoch), so a resumed run equals an
uninterrupted one bit for bit (on the same machine and thread count).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .errors import CheckpointError, InvalidOptionError, invalid_option
from .evaluate import evaluate
from .ghost import GhostSkip, SoftNeurons, anneal_progress
from .progress import get_logger, progress
from .records import environment, to_jsonable, write_folder_atomic
from .resume import differences
from .train_config import RECIPES, TrainConfig, with_overrides

__all__ = ["RECIPES", "TrainConfig", "train", "rescale_init", "apply_masks", "count_parameters", "with_overrides"]

_log = get_logger("cbs.training")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    if not isinstance(masks, Mapping) or not masks:
        raise invalid_option("masks", where, "a non-empty dict {parameter name: bool tensor}", type(masks).__name__)
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise invalid_option("masks", where, f"keyed by parameter names of the model (e.g. {', '.join(list(params)[:3])})",
                                 repr(name))
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(params[name].shape):
            raise invalid_option("masks", where, f"a tensor of shape {tuple(params[name].shape)} for {name!r}",
                                 tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__)
        out[name] = mask.to(device=params[name].device, dtype=torch.bool)
    if not any(bool(m.any()) for m in out.values()):
        raise invalid_option("masks", where, "masks that keep at least one weight (sparsity below 1)",
                             "masks that prune every weight")
    empty = [name for name, m in out.items() if not bool(m.any())]
    if empty:  # the layer's output is then its bias alone: the network may not be able to learn at all
        _log.warning("the mask prunes every weight of %s; %s", ", ".join(empty),
                     "it passes no signal, only its bias" if len(empty) == 1 else "they pass no signal, only biases")
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """θ ← θ ⊙ M for every masked parameter (in place, no grad)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def _mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.mul_(mask.to(grad.dtype))


def rescale_init(model: nn.Module, masks: Mapping[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
                 step_size: float, iterations: int = 200, lr: float = 0.01, batch_size: int = 64,
                 min_scale: float = 0.01, clip: float = 1.0, label_smoothing: float = 0.0,
                 seed: int = 0) -> dict[str, Any]:
    """GradInit-style layer-wise re-scaled initialisation of the masked network (in place).

    One positive scale α_t per weight tensor t of every Conv/Linear/BatchNorm module (α = 1 at the
    start), learned so that the loss after one simulated SGD step is lowest:

        min_α  L(B₁; θ_α − η M ⊙ ∇L(B₀; θ_α)),   θ_α = (α_t θ_t)_t,  B₀, B₁ two random batches,

    by ``iterations`` Adam steps (step ``lr``) on α, the gradient norm of α clipped to ``clip`` and each
    α_t clamped to ≥ ``min_scale``. Running BN statistics are not changed (buffers are copied), the
    model is in train mode during the search, and at the end θ_t ← α_t θ_t (zeros stay zeros).
    The GradInit gradient-norm constraint is not used (the issue's recipe does not ask for it).

    Returns ``{"scales": {name: α_t}, "loss_first": ..., "loss_last": ...}`` (losses L(B₁; ·) of the first
    and last iterations).
    """
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and getattr(m, "weight", None) is not None]
    params = {n: p.detach() for n, p in model.named_parameters()}
    alphas = {n: torch.ones((), dtype=params[n].dtype, requires_grad=True) for n in names}
    optimizer = torch.optim.Adam(list(alphas.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed + 104729)
    flags = [(m, m.training) for m in model.modules()]
    first = last = float("nan")
    try:
        model.train()
        for it in range(iterations):
            i0 = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
            i1 = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            scaled = {n: (alphas[n] * p if n in alphas else p.requires_grad_(True)) for n, p in params.items()}
            loss0 = F.cross_entropy(functional_call(model, (scaled, buffers), (images[i0],)), labels[i0],
                                    label_smoothing=label_smoothing)
            keys = list(scaled)
            grads = torch.autograd.grad(loss0, [scaled[k] for k in keys], create_graph=True, allow_unused=True)
            stepped = {}
            for k, g in zip(keys, grads):
                if g is None:
                    stepped[k] = scaled[k]
                    continue
                if k in masks:
                    g = g * masks[k].to(g.dtype)
                stepped[k] = scaled[k] - step_size * g
            loss1 = F.cross_entropy(functional_call(model, (stepped, buffers), (images[i1],)), labels[i1],
                                    label_smoothing=label_smoothing)
            optimizer.zero_grad()
            loss1.backward()
            torch.nn.utils.clip_grad_norm_(list(alphas.values()), clip)
            optimizer.step()
            with torch.no_grad():
                for a in alphas.values():
                    a.clamp_(min=min_scale)
            if it == 0:
                first = float(loss1.detach())
            last = float(loss1.detach())
    finally:
        for p in params.values():
            p.requires_grad_(False)
        for m, flag in flags:
            m.training = flag
    live = dict(model.named_parameters())
    with torch.no_grad():
        for n, a in alphas.items():
            live[n].mul_(a.detach())
    apply_masks(model, masks)
    return {"scales": {n: float(a.detach()) for n, a in alphas.items()}, "loss_first": first, "loss_last": last}


# ------------------------------------------------------------------------------------------ the loop
class _Ghosts:
    """The ghost devices of a run and the optimizer of the ghost parameters."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int) -> None:
        self.skip = None
        if config.ghost_skip:
            # seeded: the ghost branches' initialisation must not depend on the global RNG (reproducible runs)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 15485863)
                self.skip = GhostSkip(model)
        self.soft = SoftNeurons(model, config.soft_activation, 1.0, config.beta_end) if config.ghost_neurons else None
        self.optimizer = self.scheduler = None
        if self.skip is not None and any(True for _ in self.skip.parameters()):
            self.optimizer = torch.optim.SGD(self.skip.parameters(), lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)

    @property
    def active(self) -> bool:
        return self.skip is not None or self.soft is not None

    def set_progress(self, p: float) -> tuple[float | None, float | None]:
        scale = self.skip.set_progress(p) if self.skip is not None else None
        beta = self.soft.set_progress(p) if self.soft is not None else None
        return scale, beta

    def remove(self) -> None:
        if self.skip is not None:
            self.skip.remove()
        if self.soft is not None:
            self.soft.remove()
        self.skip = self.soft = self.optimizer = self.scheduler = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "skip": None if self.skip is None else self.skip.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.skip is not None and state["skip"] is not None:
            self.skip.load_state_dict(state["skip"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + epoch)


def train(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    show_progress: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (in place) with the fixed ``masks``; returns the run record.

    Args:
        model: an ``engine.models`` network (MLP or ResNet20), already initialised (re-initialised or
            loaded from a checkpoint). On return it is the plain architecture, masked, in eval mode.
        masks: ``{parameter name: bool tensor}`` (True = kept); other parameters are dense.
        train_data, test_data: ``(images (N, ...) float32, labels (N,) int64)``.
        config: :class:`TrainConfig`.
        out: folder for ``record.json``, ``checkpoint.pt``, ``mask.pt`` and, at the end, ``model.pt`` (the
            plain state dict). After every epoch the folder is replaced as a whole (a reader sees one epoch's
            files, never a mix), and one run holds it at a time (a lock beside it). None: nothing written.
        resume: continue the run in ``out`` (a new or empty ``out`` starts afresh); a finished run is
            returned as recorded. The run's settings (``config``, ``metadata`` except ``command``) and its
            masks must be the ones it started with, else it is refused naming the difference. Without
            ``resume`` (or ``overwrite``) a non-empty ``out`` is refused.
        overwrite: replace a non-empty ``out`` (its old files stay until the first epoch is written).
        stop_after: stop (resumably) after this many epochs in this call (None: run to the end).
        show_progress: a progress bar per epoch (None: when stderr is a terminal).
        metadata: extra JSON fields stored in the record (model name, mask source, ...).
        on_epoch: called with each epoch's entry.

    Returns:
        The record: ``history`` (per epoch: train_loss, test_accuracy, test_loss, lr, ghost_scale (s at the
        epoch's last step), beta, ghost_norm (‖ghost weights‖₂ at the epoch's end), seconds), ``final_accuracy``, ``final_test_loss``, ``achieved_sparsity`` (fraction of exact zeros
        in the masked tensors), ``mask_sparsity``, ``parameter_count`` (final model),
        ``original_parameter_count``, ``finished``, the config, ``gradinit`` and the environment.
    """
    where = "train()"
    if not isinstance(config, TrainConfig):
        raise invalid_option("config", where, "a TrainConfig", type(config).__name__)
    masks = _check_masks(model, masks, where)
    for name, (x, y) in (("train_data", train_data), ("test_data", test_data)):
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise invalid_option(name, where, "a non-empty (images, labels) pair of equal length",
                                 f"{x.shape[0]} images, {y.shape[0]} labels")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise invalid_option("stop_after", where, "None or an integer >= 1", repr(stop_after))
    if out is None:
        return _train(model, masks, train_data, test_data, config, None, resume, stop_after, show_progress,
                      metadata, on_epoch)
    from .outdir import check_out, locked

    out = check_out(out, where, overwrite=overwrite, resume=resume, marker="checkpoint.pt")
    with locked(out, where):  # one run per folder: a second one stops at once
        return _train(model, masks, train_data, test_data, config, out, resume, stop_after, show_progress,
                      metadata, on_epoch)


def _differences(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """The settings (``name was X, now Y``) in which a resumed run differs from the one it started with."""
    if saved is None:
        return ["the checkpoint has no record of its settings (written by an older cbs)"]
    return differences(saved, now)


def _train(model: nn.Module, masks: dict[str, torch.Tensor], train_data: tuple[torch.Tensor, torch.Tensor],
           test_data: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, out: Path | None, resume: bool,
           stop_after: int | None, show_progress: bool | None, metadata: Mapping[str, Any] | None,
           on_epoch: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    x_train, y_train = train_data
    x_test, y_test = test_data
    ckpt_path = None if out is None else out / "checkpoint.pt"
    identity = {k: v for k, v in (metadata or {}).items() if k != "command"}

    original_count = count_parameters(model)
    steps_per_epoch = math.ceil(x_train.shape[0] / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    ghost_steps = config.ghost_phase_epochs * steps_per_epoch
    config_dict = asdict(config)

    state = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged checkpoint: say which file
            raise CheckpointError(f"The checkpoint '{ckpt_path}' could not be read: {exc}") from exc
        diff = _differences(state.get("config"), config_dict) + _differences(state.get("run"), identity)
        saved_masks = state.get("masks")
        if saved_masks is not None and (set(saved_masks) != set(masks) or any(
                not torch.equal(saved_masks[k].bool(), masks[k].cpu()) for k in masks)):
            diff.append("the mask differs from the one the run started with (its mask.pt)")
        if diff:
            raise InvalidOptionError(f"Cannot resume the run in '{out}': it started with other settings ("
                                     f"{'; '.join(diff)}). Resume with the settings it started with, or start "
                                     "afresh with --overwrite (overwrite=True).")
        if state.get("finished"):
            return state["record"]

    epoch, step = 0, 0
    history: list[dict[str, Any]] = []
    gradinit: dict[str, Any] | None = None
    apply_masks(model, masks)
    ghosts_done = state is not None and not state["ghost_active"]
    ghosts = None if ghosts_done else _Ghosts(model, config, total_steps)
    if ghosts is not None and not ghosts.active:
        ghosts = None
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ghosts is not None:
            ghosts.load_state_dict(state["ghosts"])
        torch.set_rng_state(state["rng"])
        epoch, step, history, gradinit = state["epoch"], state["step"], list(state["history"]), state["gradinit"]
        _log.info("resuming %s at epoch %d", out, epoch)
    else:
        if config.rescale_init:
            t0 = time.perf_counter()
            gradinit = rescale_init(model, masks, x_train, y_train, step_size=config.lr,
                                    iterations=config.gradinit_iterations, lr=config.gradinit_lr,
                                    batch_size=config.gradinit_batch, min_scale=config.gradinit_min_scale,
                                    clip=config.gradinit_clip, label_smoothing=config.label_smoothing, seed=config.seed)
            gradinit["seconds"] = time.perf_counter() - t0
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    def record(finished: bool) -> dict[str, Any]:
        params = dict(model.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in masks)
        total = sum(masks[n].numel() for n in masks)
        last = history[-1] if history else {}
        return {
            **dict(metadata or {}),
            "finished": finished,
            "epochs_done": epoch,
            "config": config_dict,
            "recipe_techniques": config.techniques,
            "ghost_phase_epochs": config.ghost_phase_epochs,
            "history": history,
            "final_accuracy": last.get("test_accuracy") if finished else None,
            "final_test_loss": last.get("test_loss") if finished else None,
            "achieved_sparsity": zeros / total,
            "mask_sparsity": 1.0 - sum(int(m.sum()) for m in masks.values()) / total,
            "masked_weights": total,
            "parameter_count": count_parameters(model) + (0 if ghosts is None or ghosts.skip is None
                                                          else ghosts.skip.n_ghost_parameters()),
            "original_parameter_count": original_count,
            "gradinit": gradinit,
            "environment": environment(),
        }

    epochs_this_call = 0
    while epoch < config.epochs:
        t0 = time.perf_counter()
        generator = _epoch_generator(config.seed, epoch)
        images = x_train
        if config.augment:
            from .data import augment_cifar10

            images = augment_cifar10(x_train, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        order = torch.randperm(x_train.shape[0], generator=generator)
        model.train()
        loss_sum, seen = 0.0, 0
        scale = beta = None
        batches = range(steps_per_epoch)
        for b in progress(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", enabled=show_progress):
            rows = order[b * config.batch_size : (b + 1) * config.batch_size]
            if ghosts is not None:
                scale, beta = ghosts.set_progress(anneal_progress(step, ghost_steps))
            logits = model(images[rows])
            loss = F.cross_entropy(logits, y_train[rows], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if ghosts is not None and ghosts.optimizer is not None:
                ghosts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _mask_gradients(model, masks)
            optimizer.step()
            apply_masks(model, masks)  # momentum / weight decay must not revive pruned weights
            scheduler.step()
            if ghosts is not None and ghosts.optimizer is not None:
                ghosts.optimizer.step()
                ghosts.scheduler.step()
            loss_sum += float(loss.detach()) * rows.numel()
            seen += rows.numel()
            step += 1
        epoch += 1
        # ‖ghost weights‖ and s·‖ghost weights‖: shows whether SGD grows the branches to undo the decay of s
        ghost_norm = None
        if ghosts is not None and ghosts.skip is not None and ghosts.skip.n_ghost_parameters():
            ghost_norm = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in ghosts.skip.parameters())))
        if ghosts is not None and step >= ghost_steps:
            ghosts.set_progress(1.0)
            ghosts.remove()
            ghosts = None
            _log.info("ghost phase over after epoch %d: ghost branches removed, ReLU restored", epoch)
        accuracy, test_loss = evaluate(model, x_test, y_test, batch_size=config.eval_batch_size)
        entry = {"epoch": epoch, "train_loss": loss_sum / seen, "test_accuracy": accuracy, "test_loss": test_loss,
                 "lr": scheduler.get_last_lr()[0], "ghost_scale": scale, "beta": beta, "ghost_norm": ghost_norm,
                 "ghost_active": ghosts is not None, "seconds": time.perf_counter() - t0}
        history.append(entry)
        _log.info("epoch %d/%d: test accuracy %.2f %%, train loss %.4f", epoch, config.epochs, accuracy, entry["train_loss"])
        if on_epoch is not None:
            on_epoch(entry)
        finished = epoch == config.epochs
        if out is not None:
            rec = record(finished)
            cpu_masks = {k: v.cpu() for k, v in masks.items()}
            files = {
                "mask.pt": _torch_bytes(cpu_masks),
                "checkpoint.pt": _torch_bytes({
                    "config": config_dict, "run": identity, "masks": cpu_masks, "epoch": epoch, "step": step,
                    "history": history, "gradinit": gradinit, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "ghost_active": ghosts is not None, "ghosts": None if ghosts is None else ghosts.state_dict(),
                    "rng": torch.get_rng_state(), "finished": finished, "record": rec if finished else None}),
                "record.json": (json.dumps(to_jsonable(rec), indent=2) + "\n").encode(),
            }
            if finished:
                files["model.pt"] = _torch_bytes({k: v.detach().clone() for k, v in model.state_dict().items()})
            write_folder_atomic(out, files)  # the epoch's files replace the previous ones together
        epochs_this_call += 1
        if stop_after is not None and epochs_this_call >= stop_after and epoch < config.epochs:
            break
    model.eval()
    return record(epoch == config.epochs)
