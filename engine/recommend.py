"""The recommendation: the settings ``cbs prune`` runs when the user does not give them, as data.

One rule: the recommendation fills every setting, then the user's flags (or API keywords) override it.

The recommendation depends on properties of the model and the data, never on the model's name:

* the **profile** (:class:`Profile`): "batchnorm" when the model has BatchNorm layers; else "small" when its
  prunable weights fit one whole-network block (at most :data:`WHOLE_MAX` weights) and "large" otherwise;
* the target sparsity (more stages at higher sparsity, :data:`STAGES`);
* the training set's size: the gradient rows, rows' batch and loss samples shrink to fit it (:func:`fit`);
* whether the inputs are image batches (crop-and-flip augmentation for BatchNorm re-estimation).

With no method named, the recommendation is our best measured configuration (docs/results.md): for BatchNorm
models up to 0.6 sparsity, layer-wise reconstruction (:data:`LAYERWISE_UP_TO`); otherwise multi-stage
pruning by magnitude with the CBS-U update, the first-order term and the step search, for BatchNorm models
started from a layer-wise run at 0.6 or 0.7 (:data:`WARM_START`) (the zoo's MLPNet is a
"small" model, ResNet20 a "batchnorm" one, so their measured settings are the table's rows). Naming a method
gives the paper-style single stage :data:`PLAIN`; naming ``cbs`` gives the CBS paper's setting for the profile
(:data:`PAPER` with :data:`PAPER_CBS`, the setting ``scripts/reproduce.py`` runs as ``cbs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .errors import invalid_option

__all__ = ["Profile", "profile_of", "recommend", "recommended", "recommends_bn_reestimate", "describe", "flag_form", "fit", "zoo_profile",
           "layerwise_chosen", "LAYERWISE_UP_TO",
           "PLAIN", "PAPER", "PAPER_CBS", "RECIPES", "STAGES", "WHOLE_MAX", "WARM_START",
           "warm_start_for"]

#: the most prunable weights of a model pruned as one whole-network block (MLPNet: 32,360)
WHOLE_MAX = 100_000

#: multi-stage settings by profile (CHITA++-style; docs/results.md)
RECIPES: dict[str, dict[str, Any]] = {
    "small": dict(method="magnitude", update=True, fisher_samples=500, fisher_batch=32, damping=1e-3,
                  block_mode="whole", schedule="poly", first_order=True, step_search=True),
    "large": dict(method="magnitude", update=True, fisher_samples=500, fisher_batch=32, damping=1e-3,
                  block_mode="layer", schedule="poly", first_order=True, step_search=True),
    "batchnorm": dict(method="magnitude", update=True, fisher_samples=250, fisher_batch=16, damping=1e-3,
                      block_mode="layer", schedule="poly", first_order=True, step_search=True, step_search_bn=True,
                      loss_samples=1000, holdout_loss=True),
}

#: stages by sparsity: (upper sparsity, settings over RECIPES); the first row whose bound is >= the target
#: applies. "batchnorm" from 0.8 up draws 500 rows of 16 images a stage instead of 250: +0.8 points at 0.8
#: on ResNet20 over three seeds, for about 1.5x the run's seconds
STAGES: dict[str, list[tuple[float, dict[str, Any]]]] = {
    # twice the stages of the first sweeps: MLPNet +0.5 points at 0.9 (96.65 against 96.17 over three seeds)
    # and 0.95 (96.62 against 96.08); the digits MLP of examples/ +2.75 at 0.95 (docs/results.md)
    "small": [(0.9, dict(stages=40)), (1.0, dict(stages=80))],
    "large": [(0.9, dict(stages=40)), (1.0, dict(stages=80))],
    "batchnorm": [(0.6, dict(stages=4)), (0.75, dict(stages=8)), (0.8, dict(stages=8, fisher_samples=500)),
                  (1.0, dict(stages=12, fisher_samples=500))],
}

#: settings when the user names a method (single stage, paper-style)
PLAIN: dict[str, Any] = dict(fisher_samples=1000, fisher_batch=1, damping=1e-3, block_mode="layer", stages=1,
                             schedule="exp", first_order=False, step_search=False, step_search_bn=False, update=None)

#: the CBS paper's settings: MLPNet N = 10,000, λ = 1e-3, the whole network one block; ResNet20 N = 1,000,
#: λ = 1e-5, one block per layer, its 18 block convs (the "cbs" parameter preset)
PAPER: dict[str, dict[str, Any]] = {
    "small": dict(fisher_samples=10000, damping=1e-3, block_mode="whole"),
    "large": dict(fisher_samples=1000, damping=1e-5, block_mode="layer"),
    "batchnorm": dict(fisher_samples=1000, damping=1e-5, block_mode="layer", params="cbs"),
}

#: naming the paper's method gives the paper's setting: ``--method cbs`` is :data:`PAPER` over :data:`PLAIN`,
#: with the CBS-U update and, for BatchNorm models, the loss samples and random-mask trials of the sweeps
#: (``scripts/reproduce.py`` runs its ``cbs`` rows with exactly these)
PAPER_CBS: dict[str, dict[str, Any]] = {
    "small": dict(update=True),
    "large": dict(update=True),
    "batchnorm": dict(update=True, loss_samples=200, solver_params={"rmp_trials": 10}),
}


@dataclass(frozen=True)
class Profile:
    """What the recommendation looks at."""

    n_prunable: int
    has_batchnorm: bool
    n_train: int
    image_inputs: bool

    @property
    def kind(self) -> str:
        if self.has_batchnorm:
            return "batchnorm"
        return "small" if self.n_prunable <= WHOLE_MAX else "large"


def profile_of(model: nn.Module, names: list[str], n_train: int, input_ndim: int) -> Profile:
    """The profile of ``model`` with prunable ``names``, ``n_train`` training samples and inputs of
    ``input_ndim`` dimensions per batch."""
    params = dict(model.named_parameters())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return Profile(sum(params[n].numel() for n in names), has_bn, int(n_train), input_ndim == 4)


def fit(settings: dict[str, Any], n_train: int) -> dict[str, Any]:
    """``settings`` with the gradient rows, rows' batch and held-out loss samples shrunk to fit ``n_train``
    training samples: loss samples at most a fifth of them, then the rows' batch B, then the rows N."""
    out = dict(settings)
    avail = n_train
    if out.get("loss_samples") is not None:
        out["loss_samples"] = max(1, min(out["loss_samples"], n_train // 5))
        if out.get("holdout_loss"):
            avail -= out["loss_samples"]
    n, b = out.get("fisher_samples", 1000), out.get("fisher_batch", 1)
    if n * b > avail:
        b = max(1, min(b, avail // max(n, 1)))
        n = max(1, min(n, avail // b))
        out["fisher_samples"], out["fisher_batch"] = n, b
    return out


#: profiles whose recommendation up to this sparsity is layer-wise reconstruction (ADMM with the refit, 128
#: calibration samples, layers in turn, BatchNorm re-estimated after) instead of the Fisher multi-stage run.
#: ResNet20 on the full CIFAR-10 training set, mean of three seeds (docs/results.md): it is above multi-stage
#: at 0.5, 0.6 and 0.7 in a fifth to a third of the time, and below it from 0.8
LAYERWISE_UP_TO: dict[str, float] = {"batchnorm": 0.6}

#: profiles whose Fisher recommendation starts from a layer-wise run (``warm_start``: the schedule's stages up to
#: it are one layer-wise reconstruction with the loss-curve budget across layers, BatchNorm re-estimated after it
#: as after every stage): (upper target sparsity, warm start), the first row whose bound is >= the target, when
#: its warm start is below the target. ResNet20, seed 0: 90.40 at 0.7 from 0.6 and 89.33 at 0.8 from 0.7,
#: against 89.43 and 88.22 from the dense model (docs/results.md)
WARM_START: dict[str, list[tuple[float, float]]] = {"batchnorm": [(0.7, 0.6), (1.0, 0.7)]}


def warm_start_for(kind: str, sparsity: float) -> float | None:
    """The recommendation's ``warm_start`` for a Fisher run of profile ``kind`` at ``sparsity`` (None: from the
    dense model): :data:`WARM_START`."""
    if not isinstance(kind, str):
        raise invalid_option("kind", "warm_start_for()", "a profile kind (small, large, batchnorm)", repr(kind))
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise invalid_option("sparsity", "warm_start_for()", "in [0, 1)", sparsity)
    warm = next((w for bound, w in WARM_START.get(kind, []) if sparsity <= bound), None)
    return warm if warm is not None and warm < sparsity else None

#: settings the layer-wise path reads beside those of every run: naming any other setting (``--stages``,
#: ``--fisher-samples``, ``--pattern``, ...) keeps the Fisher recommendation at every sparsity
_LAYERWISE_READS = frozenset(("objective", "method", "sparsity", "seed", "progress", "time_limit", "certify_time",
                              "solver_params", "executor", "workers", "ray_address", "calibration_samples",
                              "sequential", "allocation", "update"))


def layerwise_chosen(profile: Profile, sparsity: float, method: Any = None, objective: Any = None,
                     given: Any = ()) -> bool:
    """Whether the recommendation is layer-wise reconstruction: the user asked for it (``objective``), or named
    neither a method, an objective nor a Fisher-path setting (``given``: the names of the user's settings) and
    ``sparsity`` is within :data:`LAYERWISE_UP_TO` for the profile."""
    if objective is not None:
        return objective == "reconstruction"
    return (method is None and sparsity <= LAYERWISE_UP_TO.get(profile.kind, -1.0)
            and not set(given) - _LAYERWISE_READS)


def recommend(profile: Profile, sparsity: float, method: Any = None, objective: Any = None,
              given: Any = ()) -> dict[str, Any]:
    """PruneConfig settings (method included) and the run's ``bn_reestimate``/``bn_augment``: the
    recommendation for ``profile`` at ``sparsity`` (see the module docstring), given the user's ``method``,
    ``objective`` and the names of the other settings they give (``given``; :func:`layerwise_chosen`)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise invalid_option("sparsity", "recommend()", "in [0, 1)", sparsity)
    kind = profile.kind
    if layerwise_chosen(profile, sparsity, method, objective, given):
        from .reconstruction import RECONSTRUCTION_METHOD
        from .settings import option

        return {"objective": "reconstruction", "method": RECONSTRUCTION_METHOD if method is None else method,
                "stages": 1, "allocation": "uniform",
                "calibration_samples": min(option("calibration_samples").default, profile.n_train),
                "bn_reestimate": profile.has_batchnorm and method is None,
                "bn_augment": "crop-flip" if profile.image_inputs else "none"}
    if method is None:
        by_sparsity = next(s for bound, s in STAGES[kind] if sparsity <= bound)
        settings = {**RECIPES[kind], **by_sparsity}
    else:
        settings = {**PLAIN, "method": method}
        if method == "cbs":  # the paper's method: the paper's setting (the parameter preset is the caller's)
            settings.update({k: v for k, v in PAPER[kind].items() if k != "params"}, **PAPER_CBS[kind])
    warm = warm_start_for(kind, sparsity) if method is None else None
    if warm is not None:
        settings["warm_start"] = warm
    settings = fit(settings, profile.n_train)
    settings["bn_reestimate"] = profile.has_batchnorm and method is None
    settings["bn_augment"] = "crop-flip" if profile.image_inputs else "none"
    if not settings["bn_reestimate"]:
        settings["step_search_bn"] = False  # without re-estimation the running statistics are the ones used
    return settings


#: the profiles of the zoo models (what profile_of gives for them with their data)
_ZOO_PROFILES = {"mlpnet": Profile(32360, False, 60000, True), "resnet20": Profile(270896, True, 50000, True)}


def zoo_profile(model: str) -> Profile:
    """The profile of a zoo model with its default parameters and its full training set (MLPNet: 32,360 weights,
    60,000 MNIST images; ResNet20: 270,896 weights, every conv and the fc, 50,000 CIFAR-10 images)."""
    if model not in _ZOO_PROFILES:
        raise invalid_option("model", "zoo_profile()", f"one of {', '.join(_ZOO_PROFILES)}", repr(model))
    return _ZOO_PROFILES[model]


def recommended(model: str, sparsity: float, objective: str | None = None) -> dict[str, Any]:
    """PruneConfig settings of the recommendation for a zoo model (no method named; ``objective`` "fisher" for
    the Fisher multi-stage run at every sparsity), without the run's BatchNorm settings."""
    if model not in _ZOO_PROFILES:
        raise invalid_option("model", "recommended()", f"one of {', '.join(_ZOO_PROFILES)}", repr(model))
    settings = recommend(zoo_profile(model), sparsity, objective=objective)
    settings.pop("bn_reestimate"), settings.pop("bn_augment")
    return settings


def recommends_bn_reestimate(model: str) -> bool:
    """Whether the recommended run of a zoo model re-estimates BatchNorm statistics (after every stage and at
    the end): for ResNet20 it is worth points at every sparsity (docs/results.md), MLPNet has no BatchNorm."""
    return _ZOO_PROFILES[model].has_batchnorm


#: settings that describe() writes, in this order: ``--key`` when set, or ``--key VALUE`` for those in _VALUED
_SWITCHES = ("update", "first_order", "step_search", "loss_samples")
_ADVANCED = ("step_search_bn", "holdout_loss", "couple_mean", "newton_step_only", "block_steps", "relative_damping")


_DESCRIBED = frozenset(("method", "fisher_samples", "fisher_batch", "damping", "block_mode", "stages", "schedule",
                        "warm_start", "allocation", "compensate", "bn_reestimate", "progress", *_SWITCHES, *_ADVANCED))


_RECONSTRUCTION_SHOWN = frozenset(("objective", "calibration_samples", "sequential", "pattern", "allocation"))


def flag_form(name: str, value: Any) -> list[str]:
    """``name=value`` as the flags that set it (``--param NAME=VALUE`` for the advanced ones)."""
    from .settings import PRUNE_OPTIONS

    if name == "solver_params":
        return [f"--param {k}={v}" for k, v in (value or {}).items()]
    option = next((o for o in PRUNE_OPTIONS if o.name == name), None)
    shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else getattr(value, "name", value)
    if option is None or not option.public:
        return [f"--param {name}={shown}"]
    if option.kind == "bool":  # False of a setting whose default is the method's (None) has a flag of its own
        return [option.flag] if value else ["--no-" + option.flag[2:]] if option.nullable and value is False else []
    if name == "pattern":
        return [f"--pattern {value[0]}:{value[1]}"]
    if value is None:  # a nullable setting's "off" (--warm-start none)
        return [f"{option.flag} none"]
    return [f"{option.flag} {shown}"]


def describe(settings: dict[str, Any], given: dict[str, Any] | None = None) -> str:
    """One line for the log: settings in flag form (advanced ones as ``--param NAME=true``), then the user's
    other settings (``given``: what the user set that the line's fixed part does not show, e.g. ``--seed``,
    ``--time-limit``, solver parameters), so the line is the run's whole configuration."""
    if settings.get("objective") == "reconstruction":
        flags = ["--objective reconstruction", f"--method {getattr(settings['method'], 'name', settings['method'])}",
                 f"--calibration-samples {settings['calibration_samples']}",
                 "--sequential" if settings.get("sequential", True) else "--no-sequential"]
        if settings.get("pattern"):
            flags.append(f"--pattern {settings['pattern'][0]}:{settings['pattern'][1]}")
        if settings.get("allocation", "uniform") != "uniform":
            flags.append(f"--allocation {settings['allocation']}")
        shown = _DESCRIBED | _RECONSTRUCTION_SHOWN
    else:
        flags = [f"--method {settings['method']}", f"--fisher-samples {settings['fisher_samples']}",
                 f"--fisher-batch {settings['fisher_batch']}", f"--damping {settings['damping']:g}",
                 f"--block-mode {settings['block_mode']}", f"--stages {settings['stages']}",
                 f"--schedule {settings['schedule']}"]
        if settings.get("warm_start") is not None:
            flags.append(f"--warm-start {settings['warm_start']:g}")
        if settings.get("allocation", "magnitude") != "magnitude":
            flags.append(f"--allocation {settings['allocation']}")
        for key in _SWITCHES:
            value = settings.get(key)
            if key == "loss_samples":
                if value is not None:
                    flags.append(f"--loss-samples {value}")
            elif value:
                flags.append("--" + key.replace("_", "-"))
        flags += [f"--param {key}=true" for key in _ADVANCED if settings.get(key)]
        comp = settings.get("compensate", ())
        if comp:
            flags.append(f"--param compensate={comp if isinstance(comp, str) else ','.join(comp)}")
        shown = _DESCRIBED
    if "bn_reestimate" in settings:
        flags.append("--bn-reestimate" if settings["bn_reestimate"] else "--no-bn-reestimate")
    for name, value in (given or {}).items():
        if name not in shown and value is not None:
            flags += flag_form(name, value)
    return " ".join(flags)


def as_dict(profile: Profile) -> dict[str, Any]:
    """The profile for records."""
    return {**asdict(profile), "kind": profile.kind}
