"""What every solver returns (DESIGN.md §3): the support and how good it is, and why the solver stopped."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Status", "Termination", "SolveResult"]


class Status(str, enum.Enum):
    """How good the answer is."""

    NONE = "none"  #: no feasible support
    FEASIBLE = "feasible"  #: a feasible support, optimality not proven
    OPTIMAL = "optimal"  #: proven optimal (only exact solvers may say so)


class Termination(str, enum.Enum):
    """Why the solver stopped (independent of :class:`Status`)."""

    COMPLETED = "completed"  #: a one-pass method finished (magnitude, scores)
    OPTIMAL = "optimal"  #: optimality proven
    LOCAL_OPTIMUM = "local_optimum"  #: no improving move left in the neighbourhood
    TIME_LIMIT = "time_limit"
    ITERATION_LIMIT = "iteration_limit"
    ERROR = "error"


@dataclass
class SolveResult:
    """The answer of a solver for one block.

    Attributes
    ----------
    support : (n,) bool, True = kept, exactly ``n_keep`` True entries.
    objective : E(S), re-scored by the engine with ``formulations.objective`` (a solver may fill its own
        value; the engine replaces it and checks the two agree).
    bound : a certified lower bound on min_{|S|=k} E(S), or None.
    gap : (objective − bound)/|objective|, or None.
    status, termination : see :class:`Status`, :class:`Termination`.
    wall_time : seconds spent in ``solve`` (the solver's own figure, else the engine's clock).
    time_limit : the ``SolveOptions.time_limit`` the solve ran under (None: no limit), filled by the engine.
    overshoot : seconds the call ran past ``time_limit`` by the engine's clock around it (0.0 within the
        limit, None without one); :func:`engine.solve.note_overshoot` warns beyond a grace.
    weights : (n,) updated weights v (v_P = 0) when the solver computed them, else None.
    iterations : iterations / rounds / nodes, solver-defined.
    solver : the solver's name.
    extra : free-form details (kept JSON-serialisable).
    """

    support: np.ndarray
    objective: float = float("nan")
    bound: float | None = None
    gap: float | None = None
    status: Status = Status.FEASIBLE
    termination: Termination = Termination.COMPLETED
    wall_time: float = 0.0
    weights: np.ndarray | None = None
    iterations: int = 0
    solver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    time_limit: float | None = None
    overshoot: float | None = None

    @property
    def kept(self) -> np.ndarray:
        """Kept indices (sorted), int64."""
        return np.flatnonzero(self.support)

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no arrays)."""
        return {
            "solver": self.solver,
            "objective": float(self.objective),
            "bound": None if self.bound is None else float(self.bound),
            "gap": None if self.gap is None else float(self.gap),
            "status": self.status.value,
            "termination": self.termination.value,
            "wall_time": float(self.wall_time),
            "time_limit": None if self.time_limit is None else float(self.time_limit),
            "overshoot": None if self.overshoot is None else float(self.overshoot),
            "iterations": int(self.iterations),
            "n": int(self.support.size),
            "k": int(self.support.sum()),
        }
