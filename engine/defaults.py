"""The configuration ``cbs prune`` runs when the user names no method: our best measured one per model
and sparsity (figures in docs/results.md; ``scripts/reproduce.py`` measures them).

:func:`recommended` returns :class:`~engine.pruner.PruneConfig` settings; anything the user passes on the
command line overrides them. ``PLAIN`` are the settings used when a method *is* named (the paper's
single-stage defaults), so ``--method cbs`` alone behaves as it always did.
"""

from __future__ import annotations

from typing import Any

from .errors import invalid_option
from .models import MODEL_NAMES

__all__ = ["recommended", "recommends_bn_reestimate", "PLAIN", "describe"]

#: settings when the user names a method (single stage, paper-style)
PLAIN: dict[str, Any] = dict(fisher_samples=1000, fisher_batch=1, damping=1e-3, block_mode="layer", stages=1,
                             schedule="exp", first_order=False, step_search=False, step_search_bn=False, update=None)

#: multi-stage settings shared by the recommendations (CHITA++-style; see docs/results.md)
_MULTI: dict[str, dict[str, Any]] = {
    "mlpnet": dict(method="magnitude", update=True, fisher_samples=500, fisher_batch=32, damping=1e-3,
                   block_mode="whole", schedule="poly", first_order=True, step_search=True),
    "resnet20": dict(method="magnitude", update=True, fisher_samples=250, fisher_batch=16, damping=1e-3,
                     block_mode="layer", schedule="poly", first_order=True, step_search=True, step_search_bn=True,
                     loss_samples=1000, holdout_loss=True),
}

#: settings by sparsity: (upper sparsity, settings over _MULTI); the first row whose bound is >= the
#: target applies. ResNet20 from 0.8 up draws 500 rows of 16 images a stage instead of 250: +0.8 points
#: at 0.8 on three seeds (docs/results.md), for about 1.5x the run's seconds
_BY_SPARSITY: dict[str, list[tuple[float, dict[str, Any]]]] = {
    "mlpnet": [(0.9, dict(stages=20)), (0.95, dict(stages=40)), (1.0, dict(stages=80))],
    "resnet20": [(0.6, dict(stages=4)), (0.75, dict(stages=8)), (0.8, dict(stages=8, fisher_samples=500)),
                 (1.0, dict(stages=12, fisher_samples=500))],
}


def recommended(model: str, sparsity: float) -> dict[str, Any]:
    """PruneConfig settings (method included) of our best measured configuration for ``model`` at
    ``sparsity``."""
    if model not in MODEL_NAMES:
        raise invalid_option("model", "recommended()", f"one of {', '.join(MODEL_NAMES)}", repr(model))
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise invalid_option("sparsity", "recommended()", "in [0, 1)", sparsity)
    by_sparsity = next(settings for bound, settings in _BY_SPARSITY[model] if sparsity <= bound)
    return {**_MULTI[model], **by_sparsity}


def recommends_bn_reestimate(model: str) -> bool:
    """Whether the recommended run re-estimates BatchNorm statistics (after every stage and at the end):
    for ResNet20 it is worth points at every sparsity (docs/results.md), MLPNet has no BatchNorm."""
    return model == "resnet20"


#: settings that describe() writes, in this order: ``--key`` when set, or ``--key VALUE`` for those in _VALUED
_SWITCHES = ("update", "first_order", "step_search", "step_search_bn", "loss_samples", "holdout_loss", "couple_mean",
             "newton_step_only", "block_steps")
_VALUED = ("loss_samples",)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def describe(settings: dict[str, Any]) -> str:
    """One line for the log: the recommended configuration in flag form."""
    flags = [f"--method {settings['method']}", f"--fisher-samples {settings['fisher_samples']}",
             f"--fisher-batch {settings['fisher_batch']}", f"--damping {settings['damping']:g}",
             f"--block-mode {settings['block_mode']}", f"--stages {settings['stages']}",
             f"--schedule {settings['schedule']}"]
    if settings.get("allocation", "magnitude") != "magnitude":
        flags.append(f"--allocation {settings['allocation']}")
    for key in _SWITCHES:
        value = settings.get(key)
        if key in _VALUED:
            if value is not None:
                flags.append(f"{_flag(key)} {value}")
        elif value:
            flags.append(_flag(key))
    comp = settings.get("compensate", ())
    if comp:
        flags.append(f"--compensate {comp if isinstance(comp, str) else ','.join(comp)}")
    return " ".join(flags)
