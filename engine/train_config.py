"""The settings of one sparse-training run (:class:`TrainConfig`) and its recipes, "plain" and "tost".

See :mod:`engine.training` for what each setting does; everything here is re-exported there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import invalid_option
from .ghost import SOFT_ACTIVATIONS

__all__ = ["RECIPES", "TrainConfig", "with_overrides"]

RECIPES: tuple[str, ...] = ("plain", "tost")
_TECHNIQUES = ("ghost_skip", "ghost_neurons", "rescale_init", "label_smoothing")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one sparse-training run (validated on construction).

    epochs : E >= 1.  lr, momentum, weight_decay, batch_size : the SGD settings (cosine schedule).
    ghost_skip, ghost_neurons, rescale_init : ToST techniques 1-3 on/off.
    label_smoothing : α in [0, 1) on the training loss (ToST: 0.1; plain: 0).
    ghost_epochs : T in [1, E], the length of the ghost phase (None: ceil(E / 3)).
    soft_activation : "silu", "mish", "softplus" or "elu".  beta_end : β at the end of the ghost phase.
    gradinit_iterations, gradinit_lr, gradinit_batch, gradinit_min_scale, gradinit_clip : Adam iterations
        and step size on the scales, samples per simulated batch, lower bound of weight scales, clip
        of the scales' gradient norm.
    augment : pad-4 crop + flip of CIFAR images each epoch (``engine.data.augment_cifar10``).
    seed : seeds batch order, augmentation and GradInit batches.
    eval_batch_size : samples per forward pass when testing.
    """

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    ghost_skip: bool = False
    ghost_neurons: bool = False
    rescale_init: bool = False
    label_smoothing: float = 0.0
    ghost_epochs: int | None = None
    soft_activation: str = "silu"
    beta_end: float = 100.0
    gradinit_iterations: int = 200
    gradinit_lr: float = 0.01
    gradinit_batch: int = 64
    gradinit_min_scale: float = 0.01
    gradinit_clip: float = 1.0
    augment: bool = False
    seed: int = 0
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> "TrainConfig":
        """``"plain"`` (none of the four techniques) or ``"tost"`` (all four, α = 0.1), then ``overrides``."""
        if name not in RECIPES:
            raise invalid_option("recipe", "TrainConfig.recipe()", "'plain' or 'tost'", repr(name))
        on = name == "tost"
        base = {"ghost_skip": on, "ghost_neurons": on, "rescale_init": on, "label_smoothing": 0.1 if on else 0.0}
        return cls(**{**base, **overrides})

    @property
    def ghost_phase_epochs(self) -> int:
        """T (resolved default)."""
        return self.ghost_epochs if self.ghost_epochs is not None else max(1, math.ceil(self.epochs / 3))

    @property
    def techniques(self) -> list[str]:
        """Names of the ToST techniques switched on."""
        return [t for t in _TECHNIQUES if (getattr(self, t) > 0 if t == "label_smoothing" else getattr(self, t))]

    def validate(self) -> None:
        """One clear message per bad setting."""
        where = "train()"

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise invalid_option(name, where, f"an integer >= {low}", repr(v))

        def number(name: str, low: float, high: float | None = None, low_open: bool = False,
                   high_open: bool = False) -> None:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low)
            if ok and high is not None:
                ok = v < high if high_open else v <= high
            if not ok:
                lb, rb = "(" if low_open else "[", ")" if high_open else "]"
                rng = f"in {lb}{low}, {high}{rb}" if high is not None else f"a finite number {'>' if low_open else '>='} {low}"
                raise invalid_option(name, where, rng, repr(v))

        for name in ("epochs", "batch_size", "gradinit_iterations", "gradinit_batch", "eval_batch_size"):
            integer(name, 1)
        integer("seed", 0)
        number("lr", 0.0, low_open=True)
        number("momentum", 0.0, 1.0, high_open=True)
        number("weight_decay", 0.0)
        number("label_smoothing", 0.0, 1.0, high_open=True)
        number("beta_end", 1.0)
        number("gradinit_lr", 0.0, low_open=True)
        number("gradinit_min_scale", 0.0, 1.0, low_open=True)
        number("gradinit_clip", 0.0, low_open=True)
        if self.ghost_epochs is not None:
            t = self.ghost_epochs
            if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= self.epochs:
                raise invalid_option("ghost_epochs", where, f"None or an integer in [1, epochs = {self.epochs}]", repr(t))
        if self.soft_activation not in SOFT_ACTIVATIONS:
            raise invalid_option("soft_activation", where, f"one of {', '.join(SOFT_ACTIVATIONS)}",
                                 repr(self.soft_activation))
        for name in ("ghost_skip", "ghost_neurons", "rescale_init", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise invalid_option(name, where, "True or False", repr(getattr(self, name)))


def with_overrides(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` that ignores ``None`` values (CLI flags that were not given)."""
    known = {f.name for f in fields(TrainConfig)}
    return replace(config, **{k: v for k, v in changes.items() if v is not None and k in known})
