"""Resumable ``cbs prune`` runs: a checkpoint after every completed stage or layer, and ``--resume``.

A run into ``--out`` replaces the folder as a whole after every stage of a multi-stage Fisher run (all but the
last) and after every layer of a layer-wise run: ``checkpoint.pt`` and ``progress.json`` (which stage or layer is
done). A finished folder (``record.json``, ``mask.pt``, ``model.pt``) keeps a small ``checkpoint.pt``: ``finished``
and the record, returned without work when resumed. What a checkpoint holds, and why:

* ``identity``: what shapes the result: ``PruneConfig.to_dict()`` without :data:`EXECUTION_ONLY` (where blocks
  are solved changes no result), the job's inputs (model spec, checkpoint, data, loss, metric, pruned parameters,
  BatchNorm plan, profile) and the sha1 of the starting state_dict. Every difference is refused, named, before
  any work (as ``cbs train --resume``).
* multi-stage Fisher (``unit`` "stage", :class:`StageProgress`): the model's whole state_dict after the stage and
  its ``on_stage`` hook (weights and re-estimated BatchNorm buffers), the alive masks (flat bool per parameter),
  the stage records, the accumulated fisher/select/update/prune seconds, the hook's per-stage test metric/loss.
* layer-wise (``unit`` "layer", :class:`LayerProgress`): the weights, masks and LayerRecords of the layers done.
  What is computed up front from the dense model (non-sequential Hessians, ``loss_curve`` row budgets) is
  computed again from the model as given (the dense one: the sha1 says so) before the saved weights are written.
* both: the dense test metric and loss measured before pruning (not measured again) and the seconds spent.

Everything else follows from the seed (stage t draws with ``stage_seed(seed, t)``, its BatchNorm re-estimation
with seed + t), so a resumed run equals an uninterrupted one bit for bit on the same machine and thread count
(a certificate tightened within a share of the solve time, ``certify_time``, may differ between any two runs).
Records travel as JSON text in the file (floats round-trip exactly), so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .config import StageRecord, stage_schedule
from .errors import CheckpointError, InvalidOptionError, describe_value, first_line, invalid_option
from .outdir import check_out
from .progress import get_logger
from .records import write_folder_atomic

__all__ = ["MARKER", "EXECUTION_ONLY", "StageProgress", "LayerProgress", "Book", "check_folder", "open_book",
           "run_identity", "weights_sha1", "read_checkpoint", "differences"]

log = get_logger(__name__)

MARKER = "checkpoint.pt"
PROGRESS = "progress.json"
#: settings that say where and how visibly the work runs, never what it computes: a run may resume with others
EXECUTION_ONLY = ("workers", "executor", "ray_address", "progress")
_COMMAND = "cbs prune"


@dataclass
class StageProgress:
    """A multi-stage Fisher run after ``done`` stages (:func:`engine.pruner.prune`'s ``resume_from`` and
    ``on_progress``). ``state``: the model's state_dict after stage ``done`` and its ``on_stage`` hook (the live
    tensors when handed to ``on_progress``: serialise them, do not keep them)."""

    done: int
    alive: dict[str, torch.Tensor]  # flat bool masks per pruned parameter (True = kept)
    stages: list[StageRecord]
    totals: dict[str, float]  # fisher, select, update, prune seconds so far
    state: dict[str, torch.Tensor]

    def restore(self, model: nn.Module, names: list[str], n_stages: int) -> tuple[int, dict, list, dict]:
        """Check it against the run, load ``state`` into ``model``; (done, alive, stages, totals) to go on from."""
        params = dict(model.named_parameters())
        if not 1 <= self.done < n_stages or len(self.stages) != self.done or set(self.alive) != set(names) or any(
                self.alive[n].numel() != params[n].numel() for n in names):
            raise invalid_option("resume_from", "prune()", f"a StageProgress of this run (1 to {n_stages - 1} stages "
                                 "done, one record per stage, a mask per pruned parameter)",
                                 f"{self.done} done, {len(self.stages)} records, masks for {sorted(self.alive)}")
        try:
            model.load_state_dict(self.state)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"The saved model state does not fit the model: {_first(exc)}.") from None
        return self.done, {n: self.alive[n].clone() for n in names}, list(self.stages), dict(self.totals)


@dataclass
class LayerProgress:
    """A layer-wise run after its first ``len(records)`` layers (``prune_layerwise``'s ``resume_from`` and
    ``on_progress``): kept masks (weight-shaped), weights and :class:`~engine.layerwise.LayerRecord` per layer."""

    masks: dict[str, torch.Tensor]
    records: list[Any]
    weights: dict[str, torch.Tensor]

    def restore(self, model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Check it against the run, write the saved weights; (masks, records) to go on from."""
        params = dict(model.named_parameters())
        done = list(names)[: len(self.records)]
        if [getattr(r, "name", None) for r in self.records] != done or set(self.masks) != set(done) or \
                set(self.weights) != set(done) or any(self.weights[n].shape != params[n].shape or
                                                      self.masks[n].shape != params[n].shape for n in done):
            raise invalid_option("resume_from", "prune_layerwise()", "a LayerProgress of this run: the first layers "
                                 "of names, each with its record, mask and weights",
                                 [getattr(r, "name", r) for r in self.records])
        with torch.no_grad():
            for n in done:
                params[n].copy_(self.weights[n])
        return {n: self.masks[n].clone() for n in done}, list(self.records)

    @classmethod
    def of(cls, model: nn.Module, masks: dict[str, torch.Tensor], records: list[Any]) -> "LayerProgress":
        return cls(dict(masks), list(records), {n: p.detach() for n, p in model.named_parameters() if n in masks})


def check_callback(value: Any, argument: str, where: str, what: str) -> None:
    """``value`` is None or callable, else the standard rejection naming ``argument``."""
    if value is not None and not callable(value):
        raise invalid_option(argument, where, f"None or a callable taking {what}", describe_value(value))


def _plain(value: Any) -> Any:
    """JSON types (NaN and ±inf kept: ``json`` writes and reads them back)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor, np.generic)):
        return value.tolist()
    return value.value if isinstance(value, enum.Enum) else str(value) if isinstance(value, Path) else value


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value))


def _first(exc: BaseException) -> str:
    return first_line(exc).rstrip(".")


def weights_sha1(model: nn.Module) -> str:
    """sha1 of the model's state_dict: every entry's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def run_identity(run: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it resumes (see the module docstring); JSON types."""
    settings = {k: v for k, v in run.config.to_dict().items() if k not in EXECUTION_ONLY}
    inputs = {k: v for k, v in run.describe.items() if k != "threads"}
    return json.loads(_dumps({**settings, **inputs, "weights_sha1": weights_sha1(run.model)}))


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The settings (``name was X, now Y``) in which a resumed run differs from the one it started with
    (``cbs prune --resume`` here, ``cbs train --resume`` in :mod:`engine.training`)."""
    return [f"the starting weights differ (sha1 {saved.get(k)}, now {now.get(k)})" if k == "weights_sha1" else
            f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A ``cbs prune`` checkpoint file as written by :class:`Book`; a damaged one is a :class:`CheckpointError`
    naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("command") != _COMMAND:
            raise ValueError("it is not a checkpoint of cbs prune")
        state["identity"], state["info"] = json.loads(state["identity"]), json.loads(state["json"])
        int(state["done"]), bool(state["finished"]), dict(state["tensors"])
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, say which file
        raise CheckpointError(f"The checkpoint '{path}' could not be read: {_first(exc)}. Start afresh with "
                              "--overwrite (overwrite=True).") from None
    return state


def _is_ours(folder: Path) -> bool:
    """Whether ``folder``'s checkpoint.pt is cbs prune's (a damaged one counts: resuming it names the damage)."""
    try:
        return torch.load(folder / MARKER, map_location="cpu", weights_only=True, mmap=True).get("command") == _COMMAND
    except Exception:  # noqa: BLE001
        return True


def check_folder(out: str | os.PathLike, where: str, overwrite: bool = False, resume: bool = False) -> Path:
    """:func:`engine.outdir.check_out` for ``cbs prune`` (marker ``checkpoint.pt``): a folder holding another
    command's checkpoint (``cbs train``'s) is no run to resume, and is refused unless ``overwrite``."""
    path = Path(os.fspath(out)).expanduser()
    foreign = bool(os.fspath(out).strip()) and not overwrite and path.is_dir() and (path / MARKER).is_file() \
        and not _is_ours(path)
    if not foreign:
        return check_out(out, where, overwrite=overwrite, resume=resume, marker=MARKER)
    check_out(out, where, overwrite=resume)  # without resume: the plain refusal of a non-empty folder
    api = where.endswith(")")
    raise InvalidOptionError(f"The '{'out' if api else '--out'}' argument of {where} must hold a run of cbs prune to "
                             f"resume ({MARKER}), or be new or empty. Got '{path}', whose {MARKER} is another "
                             f"command's run; pass {'overwrite' if api else '--overwrite'} to replace it.")


class Book:
    """The checkpoints of one run into ``out``; inert (no files, no hashing) when ``out`` is None.
    ``saved``: the checkpoint it resumes (None: a fresh run)."""

    def __init__(self, run: Any, out: str | os.PathLike | None, saved: dict[str, Any] | None = None):
        self.run, self.out, self.saved = run, None if out is None else Path(out), saved
        self.identity = None if out is None else run_identity(run)
        self.started = time.time()
        info = {} if saved is None else saved["info"]
        self.before = float(info.get("elapsed", 0.0))  # seconds of the calls before this one
        self.finished = saved is not None and bool(saved["finished"])
        self.dense: Any = None if info.get("dense") is None else tuple(info["dense"])
        self.stage_log: list[dict[str, Any]] = list(info.get("stage_log", []))

    @property
    def elapsed(self) -> float:
        return self.before + time.time() - self.started

    def stages(self) -> StageProgress | None:
        """The stages done, from the checkpoint (None: start at stage 1)."""
        s = self.saved
        return None if s is None or s["unit"] != "stage" else StageProgress(
            int(s["done"]), s["tensors"]["alive"], [StageRecord(**r) for r in s["info"]["stages"]],
            dict(s["info"]["totals"]), s["tensors"]["state"])

    def layers(self) -> LayerProgress | None:
        """The layers done, from the checkpoint (None: start at the first layer)."""
        from .layerwise import LayerRecord

        s = self.saved
        return None if s is None or s["unit"] != "layer" else LayerProgress(
            s["tensors"]["masks"], [LayerRecord(**r) for r in s["info"]["records"]], s["tensors"]["weights"])

    def on_stage(self, progress: StageProgress) -> None:  # prune()'s on_progress
        self.save("stage", progress.done, len(stage_schedule(self.run.config)),
                  {"state": progress.state, "alive": progress.alive},
                  {"stages": [asdict(r) for r in progress.stages], "totals": progress.totals})

    def on_layer(self, progress: LayerProgress) -> None:  # prune_layerwise()'s on_progress
        self.save("layer", len(progress.records), len(self.run.names),
                  {"masks": progress.masks, "weights": progress.weights},
                  {"records": [asdict(r) for r in progress.records]})

    def save(self, unit: str, done: int, of: int, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        """Replace the folder with ``checkpoint.pt`` and ``progress.json`` (one transaction)."""
        info = {**info, "dense": self.dense, "stage_log": self.stage_log, "elapsed": self.elapsed}
        cpu = {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in tensors.items()}
        note = {"command": _COMMAND, "finished": False, "completed": f"{done} of {of} {unit}s", "unit": unit,
                "done": done, "of": of, "seconds": info["elapsed"], "resume": "run the same cbs prune with --resume"}
        write_folder_atomic(self.out, {MARKER: self._state(False, unit, done, cpu, info),
                                       PROGRESS: (json.dumps(note, indent=2) + "\n").encode()})
        log.info("checkpoint: %d of %d %ss done (%s)", done, of, unit, self.out)

    def _state(self, finished: bool, unit: str | None, done: int, tensors: dict, info: dict) -> bytes:
        buf = io.BytesIO()
        torch.save({"command": _COMMAND, "version": 1, "finished": finished, "unit": unit, "done": done,
                    "identity": _dumps(self.identity), "json": _dumps(info), "tensors": tensors}, buf)
        return buf.getvalue()

    def final_files(self, record: dict[str, Any]) -> dict[str, bytes]:
        """The finished run's small marker (its settings and record), beside record.json, mask.pt, model.pt."""
        return {MARKER: self._state(True, None, 0, {}, {"record": record, "elapsed": self.elapsed})}

    def finish(self) -> dict[str, Any]:
        """A finished run resumed: its record, and its weights (and masks) put into the model, without work."""
        from .masking import apply_pruning

        model, folder = self.run.model, self.out
        try:
            state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
            masks = torch.load(folder / "mask.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which folder
            raise CheckpointError(f"The finished run in '{folder}' could not be loaded: {_first(exc)}.") from None
        if self.run.config.objective != "reconstruction":  # the Fisher path leaves masks attached
            params = dict(model.named_parameters())
            apply_pruning(model, {n: params[n].detach().clone() for n in masks}, masks)
        return self.saved["info"]["record"]


def open_book(run: Any, out: str | os.PathLike | None, resume: bool = False) -> Book:
    """The :class:`Book` of ``run`` into ``out``; with ``resume`` the checkpoint in ``out`` (if any) is read
    and compared with the run: a changed setting, input or starting weight is refused, each named, before any
    work; a damaged file is a :class:`CheckpointError`."""
    if not isinstance(resume, bool) or (resume and out is None):
        raise invalid_option("resume", "execute()", "True or False (True with out: the run to resume lives there)",
                             repr(resume))
    path = None if out is None else Path(out) / MARKER
    if not resume or path is None or not path.is_file():
        return Book(run, out)
    saved = read_checkpoint(path)
    book = Book(run, out, saved)
    diff = differences(saved["identity"], book.identity)
    if diff:
        raise InvalidOptionError(f"Cannot resume the run in '{out}': it started with other settings ("
                                 f"{'; '.join(diff)}). Resume with the settings it started with, or start afresh "
                                 "with --overwrite (overwrite=True).")
    if not saved["finished"]:
        log.info("resuming %s after %s %d", out, saved["unit"], saved["done"])
    return book
