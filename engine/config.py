"""The settings of a pruning run (:class:`PruneConfig`, generated from :data:`engine.settings.PRUNE_OPTIONS`)
and the records a run returns (:class:`BlockRecord`, :class:`StageRecord`, :class:`PruneReport`).

Every field of PruneConfig is an :class:`engine.settings.Option`: its default, allowed range and help live in
that table, and :meth:`PruneConfig.validate` checks each field against it before the rules that tie fields
together. The help of each field is the table's (``engine.settings.option(name).help``); the longer story of
the multi-stage run, the step search and the research variants is in :mod:`engine.stage`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

import torch

from formulations.allocation import sparsity_schedule

from .errors import invalid_option
from .result import SolveResult
from .settings import PRUNE_OPTIONS, REQUIRED

__all__ = ["PruneConfig", "PruneReport", "BlockRecord", "StageRecord", "default_update", "COMPENSATE",
           "stage_schedule"]

#: methods whose selection is not second-order: by default their weights are only masked, not updated,
#: so that "magnitude" means plain magnitude pruning and "magnitude" + update is one flag away.
_NO_UPDATE_BY_DEFAULT = ("magnitude",)

#: shorthands of PruneConfig.compensate
COMPENSATE = ("rest", "norm")


def default_update(method: Any) -> bool:
    """Whether ``method`` is followed by the CBS-U update when the caller does not say."""
    name = method if isinstance(method, str) else getattr(method, "name", "")
    return name not in _NO_UPDATE_BY_DEFAULT


class _ConfigMethods:
    """Validation and derived properties of :class:`PruneConfig` (the fields come from the option table)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject bad settings with one clear message each (before any work starts)."""
        where = "prune()"
        for o in PRUNE_OPTIONS:
            value = o.check(getattr(self, o.name), where)
            if value is not getattr(self, o.name):
                object.__setattr__(self, o.name, value)  # normalised (e.g. a list of names to a tuple)
        if self.solver_params is None:
            object.__setattr__(self, "solver_params", {})
        if self.block_mode == "chunk" and self.block_size is None:
            raise invalid_option("block_size", where, "an integer >= 1 when block_mode is 'chunk'", None)
        if self.holdout_loss and self.loss_samples is None:
            raise invalid_option("loss_samples", where, "an integer >= 1 when holdout_loss is on", None)
        if self.fisher_bn_batch_stats and self.fisher_batch < 2:
            raise invalid_option("fisher_batch", where, "an integer >= 2 when fisher_bn_batch_stats is on",
                                 self.fisher_batch)
        if self.newton_step_only and not (self.first_order and self.step_search):
            raise invalid_option("newton_step_only", where, "False unless first_order and step_search are on", True)
        if self.newton_step_only and self.couple_mean:
            raise invalid_option("newton_step_only", where, "False when couple_mean is on", True)
        if self.block_steps and (self.couple_mean or self.newton_step_only):
            raise invalid_option("block_steps", where, "False when couple_mean or newton_step_only is on", True)
        if self.block_steps and not self.applies_update:
            raise invalid_option("update", where, "True when block_steps is on (it scales the update)", self.update)
        if self.couple_mean and not self.first_order:
            raise invalid_option("first_order", where, "True when couple_mean is on", False)
        if self.pattern is not None:
            implied = 1.0 - self.pattern[0] / self.pattern[1]
            if self.stages != 1:
                raise invalid_option("stages", where, f"1 with pattern {self.pattern[0]}:{self.pattern[1]} (the "
                                     "groups fix every block's count in one pass)", self.stages)
            if self.allocation != "uniform":
                raise invalid_option("allocation", where, f"'uniform' with pattern {self.pattern[0]}:"
                                     f"{self.pattern[1]} (it keeps N of every M in every block)",
                                     repr(self.allocation))
            if abs(self.sparsity - implied) > 1e-9:
                raise invalid_option("sparsity", where, f"1 - N/M = {implied:g} with pattern "
                                     f"{self.pattern[0]}:{self.pattern[1]}", self.sparsity)
        if self.method_name == "sparsegpt" and self.objective != "reconstruction":
            raise invalid_option("method", where, "a solver name; sparsegpt needs objective 'reconstruction'",
                                 "'sparsegpt'")
        if self.objective == "reconstruction" and self.stages != 1:
            raise invalid_option("stages", where, "1 with objective 'reconstruction' (one pass, layer by layer)",
                                 self.stages)
        if self.warm_start is not None:
            if self.objective != "fisher":
                raise invalid_option("warm_start", where, "None with objective 'reconstruction' (the run is "
                                     "layer-wise already)", self.warm_start)
            if self.warm_start >= self.sparsity:
                raise invalid_option("warm_start", where, f"a sparsity below the target {self.sparsity:g} (or None)",
                                     self.warm_start)
            if self.pattern is not None:
                raise invalid_option("warm_start", where, "None with an N:M pattern (one pass fixes every block's "
                                     "count)", self.warm_start)
        if self.compensate and not self.first_order:
            raise invalid_option("first_order", where, "True when compensate names parameters (without the "
                                 "gradient term their update is zero)", False)

    @property
    def method_name(self) -> str:
        """The method's name."""
        m = self.method
        return m if isinstance(m, str) else getattr(m, "name", type(m).__name__)

    @property
    def applies_update(self) -> bool:
        """Whether the CBS-U update is applied."""
        return default_update(self.method) if self.update is None else bool(self.update)

    @property
    def needs_gradients(self) -> bool:
        """Whether a stage computes gradient rows: always, except for a selection by magnitude that is
        neither updated, budgeted by curvature, nor certified (nothing would read them)."""
        return not (self.method_name == "magnitude" and not self.applies_update and self.certify is not True
                    and self.allocation in ("magnitude", "uniform") and not self.step_search
                    and not self.compensate)

    @property
    def certifies(self) -> bool:
        """Whether every block gets its dual certificate (``certify``, or by default whenever gradients
        are computed anyway)."""
        return self.needs_gradients if self.certify is None else bool(self.certify)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings for records."""
        d = asdict(self)
        d["method"] = self.method_name
        d["update"] = self.applies_update
        d["certify"] = self.certifies
        return d


def _field(o) -> tuple:
    annotation = {"int": int, "float": float, "bool": bool, "choice": str, "str": str}.get(o.kind, Any)
    if o.default is REQUIRED:
        return (o.name, annotation)
    if isinstance(o.default, (dict, list)):
        return (o.name, annotation, field(default_factory=lambda d=o.default: type(d)(d)))
    return (o.name, annotation, field(default=o.default))


PruneConfig = make_dataclass("PruneConfig", [_field(o) for o in PRUNE_OPTIONS], bases=(_ConfigMethods,),
                             frozen=True)
PruneConfig.__module__ = __name__
PruneConfig.__doc__ = (
    "Settings of one pruning run, validated on construction (fields, defaults and ranges: "
    "engine.settings.PRUNE_OPTIONS).\n\n" + "\n".join(f"{o.name} : {o.help}." for o in PRUNE_OPTIONS)
)


@dataclass
class BlockRecord:
    """What happened in one block (all JSON-friendly). ``objective``/``bound``/``gap`` are None when the run
    computed no gradients (magnitude masking without update or certificate)."""

    label: str
    n: int
    k: int
    objective: float | None
    bound: float | None
    gap: float | None
    status: str
    termination: str
    solve_seconds: float
    selection_objective: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: seconds the solve ran past its time limit (0.0 within it, None without a limit)
    overshoot: float | None = None


@dataclass
class StageRecord:
    """One stage of a (multi-stage) run: its target sparsity, timings and the step taken."""

    stage: int
    sparsity: float
    n_keep: int
    objective_total: float | None
    fisher_seconds: float
    select_seconds: float
    update_seconds: float
    step: float = 1.0
    train_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    block_steps: list[float] | None = None


@dataclass
class PruneReport:
    """Result of :func:`engine.pruner.prune`: per-block records (of the last stage), per-stage records,
    timings, masks."""

    config: dict[str, Any]
    blocks: list[BlockRecord]
    n_total: int
    n_keep: int
    achieved_sparsity: float
    fisher_seconds: float
    select_seconds: float
    update_seconds: float
    prune_seconds: float
    stages: list[StageRecord] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    results: list[SolveResult] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors)."""
        objectives = [b.objective for b in self.blocks]
        return {
            "config": self.config, "n_total": self.n_total, "n_keep": self.n_keep,
            "achieved_sparsity": self.achieved_sparsity, "fisher_seconds": self.fisher_seconds,
            "select_seconds": self.select_seconds, "update_seconds": self.update_seconds,
            "prune_seconds": self.prune_seconds,
            "objective_total": None if None in objectives else float(sum(objectives)),
            "blocks": [asdict(b) for b in self.blocks], "stages": [asdict(t) for t in self.stages],
        }


def stage_schedule(config: PruneConfig) -> list[float]:
    """The target sparsity of every stage of a run: ``config.stages`` stages of ``config.schedule`` from 0 to
    ``config.sparsity`` (:func:`formulations.allocation.sparsity_schedule`); with ``config.warm_start`` = s₀ the
    stages whose target is at most s₀ are replaced by one layer-wise stage to s₀ (the run has one stage more or
    fewer than ``stages``; 8 poly stages to 0.8 from a warm start at 0.7: 0.7, 0.758, 0.788, 0.798, 0.8)."""
    if not isinstance(config, PruneConfig):
        raise invalid_option("config", "stage_schedule()", "a PruneConfig", type(config).__name__)
    schedule = sparsity_schedule(config.sparsity, config.stages, config.schedule)
    if config.warm_start is None:
        return schedule
    return [config.warm_start, *(s for s in schedule if s > config.warm_start + 1e-9)]  # 0.8 − 0.1 ≠ 0.7
