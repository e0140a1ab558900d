"""The user's model, checkpoint, data, loss and metric, named on the command line.

A *spec* names a function: ``FILE.py:FUNC`` (a file, relative to the working directory) or
``package.module:FUNC`` (importable). The function is called with no arguments:

* ``--model SPEC``: returns a ``torch.nn.Module`` mapping a batch of inputs to outputs. Also ``mlpnet``,
  ``resnet20`` and ``charlm`` (the zoo; charlm's weights ship in the package, see :mod:`engine.charlm`),
  ``hf:LOCAL_DIR`` (a transformers causal LM saved with ``save_pretrained``; loss and metric default to
  next-token cross-entropy and accuracy) and ``timm:NAME`` (``timm.create_model(NAME)``).
* ``--data SPEC``: returns ``(train, test)``, each a map-style Dataset of ``(input, target)`` pairs or a
  DataLoader (``test`` may be None). The zoo models default to their data sets in the data folder.
* ``--loss SPEC``: ``loss(outputs, targets) -> scalar tensor`` (mean over the batch).
* ``--metric SPEC``: ``metric(outputs, targets) -> number`` (mean over the batch).
* ``--checkpoint PATH``: a state dict, or a dict holding one under ``state_dict``/``model``/``model_state_dict``;
  ``module.`` prefixes stripped; loaded to the CPU (checkpoints saved on a GPU load); ``.safetensors`` too.

Every failure is one :class:`~engine.errors.InvalidOptionError` (exit 2 in the CLI) naming the argument, before
any work: file missing, no such function, the function raises (its one-line message), it returns the wrong type.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import models as _models
from .charlm import CHARLM_DIR
from .data import check_labels
from .errors import CBSError, InvalidOptionError, describe_value, one_line
from .losses import cross_entropy, top1_accuracy
from .sources import Samples

__all__ = ["load_function", "call_function", "UserModel", "load_model_spec", "load_data_spec", "load_loss_spec",
           "ZOO"]

WHERE = "cbs prune"


def _error(argument: str, message: str) -> InvalidOptionError:
    return InvalidOptionError(f"The '--{argument}' argument of {WHERE}: {message}")


def load_function(spec: str, argument: str) -> Callable:
    """The function a spec names (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise _error(argument, f"must be FILE.py:FUNC or package.module:FUNC. Got {spec!r}.")
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise _error(argument, f"must be FILE.py:FUNC or package.module:FUNC. Got {spec!r}.")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise _error(argument, f"the file {str(path)!r} does not exist.")
        module_name = f"_cbs_user_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file: one line, no traceback
            raise _error(argument, f"importing {str(path)!r} raised {one_line(exc)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise _error(argument, f"cannot import module {where!r} ({one_line(exc)}).") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise _error(argument, f"{where!r} has no function {name!r}.")
    if not callable(fn):
        raise _error(argument, f"{where}:{name} is a {type(fn).__name__}, not a function.")
    return fn


def call_function(spec: str, argument: str) -> Any:
    """Load the function of ``spec`` and call it with no arguments (its failure is one line)."""
    fn = load_function(spec, argument)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        raise _error(argument, f"{spec} raised {one_line(exc)}") from None


@dataclass
class UserModel:
    """A loaded model with what the run needs to know about it."""

    module: nn.Module
    spec: str
    kind: str  # "zoo", "function", "hf", "timm"
    zoo: str | None = None
    checkpoint: Path | None = None  # the file loaded into it (a zoo model's shared one by default)
    loss: Callable = cross_entropy
    metric: Callable = top1_accuracy
    loss_name: str = "cross_entropy"
    metric_name: str = "top1_accuracy"
    extra: dict[str, Any] = field(default_factory=dict)


#: the zoo: model name -> (its checkpoint under the data folder, or charlm's packaged folder; its data set's name)
ZOO = {name: (_models.DEFAULT_CHECKPOINTS[name], data) for name, data in (("mlpnet", "mnist"), ("resnet20", "cifar10"))}
ZOO["charlm"] = (CHARLM_DIR, "tinyshakespeare")


def _next_token() -> dict[str, Any]:
    """The loss and metric fields of a causal language model (hf:DIR, charlm): next-token cross-entropy and
    accuracy."""
    from . import hub

    return dict(loss=hub.token_cross_entropy, metric=hub.token_accuracy, loss_name="token_cross_entropy",
                metric_name="token_accuracy")


def _load_charlm(checkpoint: str | Path | None) -> UserModel:
    """charlm from its packaged folder; ``checkpoint``: another save_pretrained folder, or a state dict file
    (e.g. the model.pt of a pruned run) loaded into the packaged model."""
    from . import charlm, models
    from .errors import CheckpointError, DataNotFoundError

    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and not path.exists():
        raise _error("checkpoint", f"{str(path)!r} does not exist (charlm takes a save_pretrained folder or a "
                     "state dict file).")
    try:
        module, vocab = charlm.load_charlm(path if path is not None and path.is_dir() else None)
    except (CheckpointError, DataNotFoundError, InvalidOptionError) as exc:
        raise _error("checkpoint", str(exc)) from None
    if path is not None and path.is_file():
        models.load_checkpoint(module, path, "charlm")
    return UserModel(module.eval(), "charlm", "zoo", zoo="charlm", checkpoint=path or CHARLM_DIR,
                     extra={"vocab": vocab}, **_next_token())


def load_model_spec(spec: str, checkpoint: str | Path | None, data_dir: Path) -> UserModel:
    """Build the model of ``spec`` and load ``checkpoint`` into it (zoo models: their shared checkpoint by
    default), in eval mode on the CPU."""
    from . import hub, models

    if spec == "charlm":
        return _load_charlm(checkpoint)
    if spec in ZOO:
        path = Path(checkpoint) if checkpoint is not None else data_dir / ZOO[spec][0]
        if not path.is_file():
            raise _error("checkpoint", f"the checkpoint {str(path)!r} does not exist"
                         + ("." if checkpoint is not None else " (pass --checkpoint or --data-dir)."))
        return UserModel(models.load_model(spec, path), spec, "zoo", zoo=spec, checkpoint=path)
    if spec.startswith("hf:"):
        user = UserModel(hub.load_hf_causal_lm(spec[3:]), spec, "hf", **_next_token())
    elif spec.startswith("timm:"):
        user = UserModel(hub.load_timm_model(spec[5:]), spec, "timm")
    else:
        module = call_function(spec, "model")
        if not isinstance(module, nn.Module):
            raise _error("model", f"{spec} must return a torch.nn.Module. Got a {type(module).__name__}.")
        user = UserModel(module, spec, "function")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise _error("checkpoint", f"the file {str(checkpoint)!r} does not exist.")
        models.load_checkpoint(user.module, checkpoint, spec)
        user.checkpoint = Path(checkpoint)
    user.module.eval()
    return user


def load_data_spec(spec: str | None, model: UserModel, data_dir: Path) -> tuple[Samples, Samples | None, str]:
    """(train, test, description) of ``--data`` (the zoo's data set when not given)."""
    if spec is None:
        if model.zoo is None:
            raise _error("data", "is required for a model outside the zoo (FILE.py:FUNC returning (train, test)).")
        if model.zoo == "charlm":  # (input, next characters) windows of the text, in the model's vocabulary
            from .charlm import charlm_data

            train, test = charlm_data(data_dir, vocab=model.extra.get("vocab"))
        else:
            from .data import dataset_for_model

            train, test = (tuple(dataset_for_model(model.zoo, data_dir, split)) for split in ("train", "test"))
        return Samples(train, "train"), Samples(test, "test"), f"{ZOO[model.zoo][1]} in {data_dir}"
    out = call_function(spec, "data")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _error("data", f"{spec} must return (train, test). Got {describe_value(out)}.")
    try:
        train = Samples(out[0], "train")
        test = None if out[1] is None else Samples(out[1], "test")
    except CBSError as exc:
        raise _error("data", f"{spec}: {exc}") from None
    return train, test, spec


def load_loss_spec(spec: str | None, model: UserModel, argument: str) -> tuple[Callable, str]:
    """(function, name) of ``--loss``/``--metric`` (the model's default when not given)."""
    if spec is None:
        return (model.loss, model.loss_name) if argument == "loss" else (model.metric, model.metric_name)
    return load_function(spec, argument), spec


def check_data_against_model(model: UserModel, train: Samples, loss: Callable, metric: Callable) -> None:
    """One forward pass on two training samples, the loss and the metric on it: the data yield what the model
    takes, targets are in range (a class index below the outputs' last size), and the loss is a finite scalar.
    Any failure is one clear error before the real work."""
    try:
        x, y = train.first()
    except CBSError as exc:
        raise _error("data", str(exc)) from None
    try:
        with torch.no_grad():
            out = model.module(x)
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's data
        raise _error("data", f"the model cannot take the training inputs of shape {tuple(x.shape)}: "
                     f"{one_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        raise _error("model", f"the model must return a tensor of outputs. Got a {type(out).__name__}.")
    if loss is cross_entropy and not (y.dtype.is_floating_point or y.dtype == torch.bool):
        classes = out.shape[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise _error("data", f"targets must be class indices in [0, {classes - 1}] for a model with {classes} "
                         f"outputs. Got targets in [{int(y.min())}, {int(y.max())}].")
        if train.tensors is not None:  # in memory: every target is checked now, not when a batch reaches it
            try:
                check_labels(train.tensors[1], classes, "the training data")
            except CBSError as exc:
                raise _error("data", f"{exc} The model has {classes} outputs.") from None
    try:
        value = loss(out, y)
        score = float(metric(out, y))
    except Exception as exc:  # noqa: BLE001
        raise _error("loss", f"the loss or metric failed on a batch of the data: {one_line(exc)}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise _error("loss", f"must return a scalar tensor. Got {describe_value(value)}.")
    if not torch.isfinite(value).all() or score != score:
        raise _error("loss", "the loss or metric is not finite on the first training samples.")
