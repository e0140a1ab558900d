"""Solver registry: built-ins, ``@register_solver``, and entry points in group ``cbs.solvers``.

Built-in solvers are named here as ``"module:Class"`` strings and imported on first use, so
``import engine`` never imports an optional solver package. A plug-in is added in one of three ways:

1. pass an instance wherever a solver name is accepted (``prune(model, method=MySolver())``);
2. decorate its class (or a zero-argument factory) with ``@register_solver("name")``;
3. declare an entry point in group ``cbs.solvers`` (``name = "package.module:Class"``). A plug-in
   that fails to load emits a warning, once per process however often the entry points are read
   (:func:`refresh`), and the others keep working.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from ..errors import InvalidOptionError, SolverUnavailableError, one_line
from .base import SubsetSolver

__all__ = [
    "register_solver", "get_solver", "solver_names", "solver_info", "install_hint", "refresh", "PluginLoadWarning",
]

ENTRY_POINT_GROUP = "cbs.solvers"

_BUILTIN: dict[str, str] = {
    "magnitude": "engine.solvers.magnitude:MagnitudeSolver",
    "woodfisher": "engine.solvers.woodfisher:WoodFisherSolver",
    "wanda": "engine.solvers.wanda:WandaSolver",
    "greedy": "engine.solvers.greedy:GreedySolver",
    "cbs": "engine.solvers.local_search:CBSSolver",
    "iht": "engine.solvers.iht:IHTSolver",
    "swap": "engine.solvers.swap:SwapSolver",
    "admm": "engine.solvers.admm:ADMMSolver",
    "brute_force": "engine.solvers.brute_force:BruteForceSolver",
    "bnb": "engine.solvers.branch_and_bound:BranchAndBoundSolver",
    "highs": "engine.solvers.highs:HighsSolver",
    "pyomo": "engine.solvers.pyomo_backend:PyomoSolver",
    "cvxpy": "engine.solvers.cvxpy_backend:CvxpySolver",
}

#: optional module → the pip extra of cbs-prune that installs it (pyproject.toml); highspy is core
EXTRA_OF_MODULE: dict[str, str] = {
    "pyomo": "pyomo",
    "cvxpy": "cvxpy",
    "pyscipopt": "scip",
    "gurobipy": "gurobi",
    "matplotlib": "plots",
    "tqdm": "progress",
    "transformers": "hf",
    "safetensors": "hf",
    "timm": "timm",
}

_registered: dict[str, Callable[..., SubsetSolver]] = {}
_entry_points_loaded = False
#: (name, value) of the entry points whose load failure was already warned about in this process
_warned_plugins: set[tuple[str, str]] = set()


class PluginLoadWarning(UserWarning):
    """A solver plug-in (entry point) could not be loaded; the other solvers still work."""


def register_solver(name: str) -> Callable[[Any], Any]:
    """Class decorator: make a solver available under ``name``.

    >>> @register_solver("my_magnitude")            # doctest: +SKIP
    ... class MyMagnitude(SubsetSolver): ...
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidOptionError(
            f"The 'name' argument of register_solver() must be an identifier-like string. Got {name!r}."
        )

    def decorate(factory: Any) -> Any:
        _registered[name] = factory
        return factory

    return decorate


def refresh() -> None:
    """(Re-)load entry points of group ``cbs.solvers``; failures are skipped, and each broken entry point
    warns (:class:`PluginLoadWarning`) the first time only in this process: a CLI command, or a session that
    calls this again and again, hears about it once."""
    global _entry_points_loaded
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plug-in must not break the rest
            key = (str(ep.name), str(ep.value))
            if key not in _warned_plugins:
                _warned_plugins.add(key)
                warnings.warn(
                    f"Solver plug-in '{ep.name}' ({ep.value}) failed to load and is skipped: {one_line(exc)}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
            continue
        _registered.setdefault(ep.name, factory)


def _ensure_loaded() -> None:
    if not _entry_points_loaded:
        refresh()


def solver_names() -> list[str]:
    """Every known solver name: built-ins first, then registered plug-ins."""
    _ensure_loaded()
    return list(_BUILTIN) + sorted(n for n in _registered if n not in _BUILTIN)


def install_hint(missing: list[str] | tuple[str, ...], extra: str | None = None) -> str:
    """The pip command that installs ``missing`` modules: ``pip install 'cbs-prune[EXTRA]'`` when the
    solver names its extra or every module belongs to one (:data:`EXTRA_OF_MODULE`), else the modules."""
    if extra:
        return f"pip install 'cbs-prune[{extra}]'"
    extras = [EXTRA_OF_MODULE.get(m.split(".")[0]) for m in missing]
    if missing and all(extras):
        return f"pip install 'cbs-prune[{','.join(dict.fromkeys(extras))}]'"  # type: ignore[arg-type]
    return "pip install " + " ".join(missing)


def _factory(name: str) -> Callable[..., SubsetSolver]:
    _ensure_loaded()
    if name in _registered:
        return _registered[name]
    if name in _BUILTIN:
        module, _, cls = _BUILTIN[name].partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a built-in needing an optional package it does not have
            missing = (exc.name or "").split(".")[0]
            if missing not in EXTRA_OF_MODULE and missing != "highspy":
                raise
            raise SolverUnavailableError(
                f"{missing} is not installed: {install_hint([missing])} (needed by solver '{name}')", name=missing
            ) from exc
        return getattr(mod, cls)
    raise InvalidOptionError(
        f"The 'method' argument must be one of {', '.join(solver_names())}. Got {name!r}."
    )


def get_solver(solver: str | SubsetSolver, **params: Any) -> SubsetSolver:
    """Return a solver instance from a name (with constructor ``params``) or pass an instance through."""
    if isinstance(solver, SubsetSolver):
        if params:
            raise InvalidOptionError("Solver parameters can only be given with a solver name, not an instance.")
        return solver
    if not isinstance(solver, str):
        if hasattr(solver, "solve") and hasattr(solver, "name"):
            return solver  # duck-typed plug-in honouring the protocol
        raise InvalidOptionError(
            f"The 'method' argument must be a solver name or a SubsetSolver instance. Got {solver!r}."
        )
    factory = _factory(solver)
    if params:
        import inspect

        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # a factory without a signature: let it judge its parameters
            accepted = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in params if accepted and not takes_any and k not in accepted]
        if unknown:
            names = [k for k, p in accepted.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise InvalidOptionError(
                f"The '{unknown[0]}' parameter is not one of solver '{solver}''s parameters "
                f"({', '.join(names) or 'it takes none'}). Got {params[unknown[0]]!r}."
            )
    return factory(**params)


def pattern_solvers() -> list[str]:
    """The names of the available solvers whose capabilities say they honour N:M patterns."""
    names = []
    for name in solver_names():
        try:
            inst = get_solver(name)
        except Exception:  # noqa: BLE001 - a solver that cannot be built is not offered
            continue
        if getattr(inst.capabilities, "patterns", False) and inst.available():
            names.append(name)
    return names


@dataclass(frozen=True)
class SolverInfo:
    """One row of ``cbs solvers``."""

    name: str
    exact: bool
    reports_bound: bool
    available: bool
    install: str | None
    description: str
    error: str | None = None
    #: the pip extra(s) of cbs-prune the solver needs (None: the core suffices)
    extra: str | None = None
    #: it honours N:M patterns (Capabilities.patterns)
    patterns: bool = False


def solver_info() -> list[SolverInfo]:
    """Capabilities and availability of every known solver."""
    rows = []
    for name in solver_names():
        try:
            inst = get_solver(name)
        except Exception as exc:  # noqa: BLE001 - a broken solver is listed, not fatal
            module = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ImportError) else ""
            hint = install_hint([module]) if module in EXTRA_OF_MODULE else None
            rows.append(SolverInfo(name, False, False, False, hint, "", f"{type(exc).__name__}: {exc}",
                                   EXTRA_OF_MODULE.get(module)))
            continue
        cap = inst.capabilities
        missing = cap.missing_modules()
        install = install_hint(missing, cap.extra) if missing else None
        extra = cap.extra or ",".join(dict.fromkeys(EXTRA_OF_MODULE[m] for m in cap.requires if m in EXTRA_OF_MODULE))
        rows.append(SolverInfo(name, cap.exact, cap.reports_bound, not missing, install, cap.description,
                               extra=extra or None, patterns=bool(getattr(cap, "patterns", False))))
    return rows
