"""The one table of options: every setting of a pruning run is defined here once.

An :class:`Option` holds a setting's name, kind, allowed range, default and help text. From the tables

* :data:`PRUNE_OPTIONS`, the settings of :class:`engine.config.PruneConfig` (how blocks are formed, solved and
  updated), and
* :data:`JOB_OPTIONS`, the settings of a whole run (``cbs prune`` and :func:`engine.pipeline.prepare`: which model, data,
  loss, parameters, BatchNorm re-estimation),

come the config's field defaults and per-field validation (:meth:`Option.check`), the ``cbs prune`` flags
(:func:`add_flags`; an option with ``public=False`` is no flag but is still reachable as
``--param NAME=VALUE``), the parsing of ``--param`` values (:meth:`Option.parse`) and the generated rejection
tests (:meth:`Option.bad_values`, used by ``tests/test_settings.py``).

Defaults follow one rule: the recommendation (:mod:`engine.recommend`) fills every setting the user did not
give; what the user gives wins. A ``default`` here is what the Python API uses when neither says anything.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import invalid_option

__all__ = ["Option", "PRUNE_OPTIONS", "JOB_OPTIONS", "option", "add_flags", "given_flags", "REQUIRED"]

#: marks an option without a default (the caller must give it)
REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One setting.

    kind : "int", "float", "bool", "choice", "str" or "object" (anything; checked by ``validator``).
    low, high, low_open, high_open : the numeric range (open ends exclude the bound).
    choices : the allowed values of a "choice" (a tuple, or a function returning one, for lists known only
        at run time such as the registered solvers).
    nullable : None is allowed (it means "not set": the recommendation or the code decides).
    public : a flag of ``cbs prune``; otherwise only reachable through ``--param NAME=VALUE``.
    validator : an extra check for "object" options (returns the normalised value or raises).
    """

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | Callable[[], tuple] | None = None
    nullable: bool = False
    public: bool = True
    metavar: str | None = None
    allowed_text: str | None = None
    validator: Callable[[Any, str], Any] | None = None
    reader: Callable[[str], Any] | None = None  # text -> value for "object" options (--param NAME=TEXT)

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--fisher-samples``."""
        return "--" + self.name.replace("_", "-")

    def allowed_choices(self) -> tuple:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c or ())

    def allowed(self) -> str:
        """The allowed values in words, as error messages show them."""
        if self.allowed_text:
            text = self.allowed_text
        elif self.kind == "bool":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.allowed_choices()))
        elif self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                text = f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text = f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            else:
                text = noun
        else:
            text = "a string"
        return ("None or " + text) if self.nullable else text

    def check(self, value: Any, where: str) -> Any:
        """``value`` if allowed (ints accepted for floats, tuples for lists), else InvalidOptionError naming
        the option, the allowed range and the value."""
        if value is None and self.nullable:
            return None
        bad = invalid_option(self.name, where, self.allowed(), repr(value) if isinstance(value, str) else value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
        elif self.kind == "choice":
            if not isinstance(value, str) or value not in self.allowed_choices():
                raise bad
            return value
        elif self.kind == "str":
            if not isinstance(value, str) or not value:
                raise bad
            return value
        elif self.kind == "object":
            return self.validator(value, where) if self.validator is not None else value
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise bad
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise bad
        return float(value) if self.kind == "float" else value

    def parse(self, text: str, where: str = "cbs prune") -> Any:
        """The value of ``text`` (a flag's or ``--param NAME=TEXT``'s), checked."""
        text = text.strip()
        if self.nullable and text.lower() in ("none", "null") and text not in self.allowed_choices():
            return None
        try:
            if self.kind == "int":
                value: Any = int(text)
            elif self.kind == "float":
                value = float(text)
            elif self.kind == "bool":
                low = text.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value = low in ("true", "1", "yes", "on")
            else:
                value = self.reader(text) if self.reader is not None else text
        except ValueError:
            raise invalid_option(self.name, where, self.allowed(), repr(text)) from None
        return self.check(value, where)

    def bad_values(self) -> list[Any]:
        """Values the option must reject (for the generated rejection tests)."""
        out: list[Any] = ["not-a-value"] if self.kind in ("int", "float", "bool") else []
        if self.kind == "bool":
            out.append(1)
        if self.kind in ("int", "float"):
            if self.low is not None:
                out.append(self.low if self.low_open else self.low - 1)
            if self.high is not None:
                out.append(self.high if self.high_open else self.high + 1)
            out.append(float("nan"))
            if self.kind == "int":
                out.append(2.5)
        if self.kind == "choice":
            out.append("no-such-choice")
        if not self.nullable and self.kind != "object":
            out.append(None)
        return out

    def argparse_type(self) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                return self.parse(text)
            except ValueError:
                try:
                    float(text)
                    shown = text  # a number out of range: as typed
                except ValueError:
                    shown = repr(text)
                allowed = self.allowed()[len("None or "):] if self.nullable else self.allowed()
                raise argparse.ArgumentTypeError(f"must be {allowed}. Got {shown}.") from None
        parse.__name__ = self.name  # argparse names the type in some messages
        return parse


def _solver_choices() -> tuple:
    from .solvers.registry import solver_names

    return tuple(solver_names())


def _method(value: Any, where: str) -> Any:
    from .solvers.base import SubsetSolver

    if isinstance(value, (str, SubsetSolver)) or hasattr(value, "solve"):
        return value
    raise invalid_option("method", where, "a solver name or a SubsetSolver", repr(value))


def _compensate(value: Any, where: str) -> Any:
    if isinstance(value, str):
        if value in ("rest", "norm"):
            return value
    elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise invalid_option("compensate", where, "'rest', 'norm' or a tuple of parameter names", repr(value))


def _pattern(value: Any, where: str) -> Any:
    from formulations.patterns import parse_pattern

    try:
        return parse_pattern(value)
    except ValueError:
        raise invalid_option("pattern", where, "'unstructured' or N:M with integers 1 <= N < M (e.g. 2:4)",
                             repr(value)) from None


def _solver_params(value: Any, where: str) -> Any:
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise invalid_option("solver_params", where, "a dict of solver constructor parameters", repr(value))


_S = Option  # short alias for the table below

#: the settings of PruneConfig, in its field order (sparsity first: it has no default)
PRUNE_OPTIONS: tuple[Option, ...] = (
    _S("sparsity", "float", REQUIRED, "fraction of the prunable weights removed", 0.0, 1.0, high_open=True),
    _S("method", "object", "cbs", "selection method (a solver name or instance); default: the recommendation",
       validator=_method, metavar="NAME"),
    _S("update", "bool", None, "apply the CBS-U least-squares update of the kept weights (default: every method "
       "but magnitude)", nullable=True),
    _S("fisher_samples", "int", 1000, "N, gradient rows of the empirical Fisher", 1),
    _S("fisher_batch", "int", 1, "training samples averaged per gradient row", 1),
    _S("damping", "float", 1e-3, "λ > 0 added to the Fisher (H = F + λI)", 0.0, low_open=True),
    _S("block_mode", "choice", "layer", "how weights are split into independent blocks",
       choices=("layer", "whole", "chunk", "row")),
    _S("block_size", "int", None, "weights per block with --block-mode chunk", 1, nullable=True),
    _S("allocation", "choice", "magnitude", "budget across blocks: global |w| or OBS-score threshold, the same "
       "sparsity everywhere, or the exact loss-curve knapsack", choices=("magnitude", "obs", "uniform", "loss_curve")),
    _S("stages", "int", 1, "prune in K stages, re-linearising at every stage (no SGD)", 1),
    _S("schedule", "choice", "exp", "sparsity schedule of the stages", choices=("linear", "exp", "poly")),
    _S("first_order", "bool", False, "include the mean gradient in the quadratic model (damped Newton step)"),
    _S("step_search", "bool", False, "after each stage take the step towards the update with the lowest "
       "training loss"),
    _S("loss_samples", "int", None, "training samples scoring masks and steps (default: the Fisher samples)", 1,
       nullable=True),
    _S("objective", "choice", "fisher", "the Fisher model of the loss, or layer-wise output reconstruction",
       choices=("fisher", "reconstruction")),
    _S("calibration_samples", "int", 128, "reconstruction: samples whose layer inputs build H", 1),
    _S("sequential", "bool", True, "reconstruction: layers see the pruned layers' outputs"),
    _S("warm_start", "float", None, "fisher: stages start from layer-wise reconstruction to S (none: dense)",
       0.0, 1.0, high_open=True, nullable=True, metavar="S"),
    _S("pattern", "object", None, "keep N of every M consecutive inputs of every row (both objectives)",
       validator=_pattern,
       nullable=True,
       metavar="N:M", reader=lambda text: text, allowed_text="'unstructured' or N:M with integers 1 <= N < M"),
    _S("seed", "int", 0, "seeds every sample draw and every solver", 0),
    _S("time_limit", "float", None, "per-block solver time limit in seconds", 0.0, low_open=True, nullable=True),
    _S("workers", "int", 1, "blocks solved at once (processes; on Ray, 1 = one per CPU of the cluster)", 1),
    _S("executor", "choice", None, "where blocks and rows are solved: local (here), processes or ray (default: "
       "processes when --workers > 1)", choices=("local", "processes", "ray"), nullable=True, metavar="KIND"),
    _S("ray_address", "str", None, "Ray cluster (HOST:PORT, ray://HOST:PORT, auto; default: start one here)",
       nullable=True, metavar="ADDRESS"),
    _S("solver_params", "object", None, "constructor parameters of the method (--param NAME=VALUE)",
       validator=_solver_params, nullable=True, public=False),
    _S("certify", "bool", None, "attach the dual certificate (bound, gap) to every block; default: whenever the "
       "method computes gradients anyway (not for magnitude without update)", nullable=True, public=False),
    _S("certify_time", "float", None, "seconds per block tightening its certificate (relaxation, then bnb); 0: "
       "the residual's dual bound; default: 5 % of the solve", 0.0, nullable=True),
    _S("chunk_size", "int", 256, "training samples vmapped at once by the gradient computation", 1, public=False),
    _S("progress", "bool", None, "progress bars (default: when stderr is a terminal)", nullable=True, public=False),
    # set by the recommendation for models with BatchNorm; reachable through --param
    _S("holdout_loss", "bool", False, "draw the loss samples disjoint from the Fisher samples", public=False),
    _S("step_search_bn", "bool", False, "the step search measures losses with BatchNorm on batch statistics",
       public=False),
    _S("relative_damping", "bool", False, "λ = damping · mean(diag F)", public=False),
    # research variants that measured as losses (docs/results.md, "What did not help")
    _S("evaluate_update", "bool", False, "cbs scores candidate masks after the CBS-U update", public=False),
    _S("fisher_bn_batch_stats", "bool", False, "gradient rows with BatchNorm on each row's batch statistics",
       public=False),
    _S("compensate", "object", (), "parameters never pruned but updated with the kept weights: 'rest', 'norm' or "
       "names", validator=_compensate, public=False,
       reader=lambda text: text if text in ("rest", "norm") else tuple(t for t in text.split(",") if t)),
    _S("couple_mean", "bool", False, "couple the blocks' Newton steps through the mean gradient", public=False),
    _S("newton_step_only", "bool", False, "the step search scales only the Newton part of the update", public=False),
    _S("block_steps", "bool", False, "scale each block's update by its own step from the joint quadratic model",
       public=False),
)


#: the settings of a whole run besides PruneConfig (engine.pipeline.prepare and ``cbs prune``)
JOB_OPTIONS: tuple[Option, ...] = (
    _S("model", "str", REQUIRED, "mlpnet, resnet20, charlm, FILE.py:FUNC, package.module:FUNC, hf:DIR or timm:NAME",
       metavar="SPEC"),
    _S("checkpoint", "str", None, "state dict to load (.pt/.pth/.ckpt/.npz/.safetensors); zoo: the shared one",
       nullable=True, metavar="PATH"),
    _S("data", "str", None, "FILE.py:FUNC returning (train, test) Datasets or DataLoaders (zoo: its own)",
       nullable=True, metavar="SPEC"),
    _S("data_dir", "str", None, "folder laid out like ../shared/data (default: $CBS_DATA_DIR, else "
       "./../shared/data)", nullable=True, metavar="DIR"),
    _S("loss", "str", None, "FILE.py:FUNC, loss(outputs, targets) -> scalar (default: cross-entropy)",
       nullable=True, metavar="SPEC"),
    _S("metric", "str", None, "FILE.py:FUNC, metric(outputs, targets) -> number (default: top-1 accuracy %)",
       nullable=True, metavar="SPEC"),
    _S("params", "str", None, "parameters to prune: globs on names or module types (Linear, Conv2d), comma-"
       "separated, or a zoo preset (cbs, chita); default every Conv/Linear weight", nullable=True,
       metavar="PATTERNS"),
    _S("bn_reestimate", "bool", None, "re-estimate BatchNorm statistics after every stage and at the end "
       "(default: the recommendation's)", nullable=True),
    # 4,000 (two augmented copies each): ResNet20 at 0.8 gave 88.22 against 88.15 with 10,000, in 571 s
    # against 740 s (docs/results.md)
    _S("bn_samples", "int", 4000, "training samples of each BatchNorm re-estimation", 1, public=False),
    _S("bn_augment", "choice", None, "augmentation of the BatchNorm samples: crop-flip (random crop of the padded "
       "image + flip, padding with the data's own black level) or none; default: crop-flip for image batches",
       choices=("crop-flip", "none"), nullable=True, public=False),
    _S("stage_test", "bool", True, "measure the test metric after every stage of a multi-stage run (records only; "
       "one test pass a stage)", public=False),
    _S("threads", "int", None, "torch and BLAS threads (default: the machine's cores)", 1, nullable=True),
    _S("overwrite", "bool", None, "replace a non-empty --out folder (default: refuse it)", nullable=True),
)

_BY_NAME = {o.name: o for o in PRUNE_OPTIONS + JOB_OPTIONS}


def option(name: str) -> Option:
    """The table entry of ``name``."""
    return _BY_NAME[name]


class _StoreValue(argparse.Action):
    """Store the value; a nullable flag given as ``none`` is remembered as given (``--warm-start none`` must
    override a recommendation that sets it, where a flag left at None leaves the recommendation's value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if values is None:
            namespace.__dict__.setdefault("_given_none", set()).add(self.dest)


def add_flags(parser: argparse.ArgumentParser, options: tuple[Option, ...], skip: tuple[str, ...] = ()) -> None:
    """One flag per public option (default None: "not given", so the recommendation decides)."""
    for o in options:
        if not o.public or o.name in skip:
            continue
        required = o.default is REQUIRED
        help_ = o.help.replace("%", "%%")  # argparse formats help with %
        if o.kind == "bool":  # --x / --no-x, one of the two
            group = parser.add_mutually_exclusive_group()
            group.add_argument(o.flag, dest=o.name, action="store_true", default=None,
                               help=f"{help_} (--no-{o.flag[2:]}: off)")
            group.add_argument(f"--no-{o.flag[2:]}", dest=o.name, action="store_false", default=None,
                               help=argparse.SUPPRESS)
        elif o.kind == "choice":
            parser.add_argument(o.flag, choices=o.allowed_choices(), default=None, required=required, help=help_,
                                metavar=o.metavar)
        else:
            metavar = o.metavar or {"int": "N", "float": "X"}.get(o.kind, "VALUE")
            parser.add_argument(o.flag, type=o.argparse_type(), default=None, required=required, metavar=metavar,
                                help=help_, action=_StoreValue)


def given_flags(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    """The settings the user gave on the command line (flags left at None are not given; a nullable flag given
    as ``none`` is)."""
    named_none = getattr(args, "_given_none", set())
    return {o.name: getattr(args, o.name) for o in options
            if o.public and (getattr(args, o.name, None) is not None or o.name in named_none)}
