"""Options shared by every solver. Solver-specific parameters go to the solver's constructor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from formulations.objective import UpdateMemo

from .errors import invalid_option

__all__ = ["SolveOptions"]


@dataclass(frozen=True)
class SolveOptions:
    """Generic solve options.

    Attributes
    ----------
    time_limit : seconds, or None for no limit. A solver that hits it returns its incumbent with
        ``Termination.TIME_LIMIT`` (never raises).
    seed : seed of every random choice a solver makes.
    progress : show a progress bar for long solves.
    evaluate : optional model-level score of a support (lower is better), ``evaluate(support) -> float``,
        e.g. the training loss of the network with this block's mask applied. Solvers that use it
        (``cbs``: choice among randomized masks and passes) fall back to the quadratic model when None.
    certify : compute the free dual certificate (DESIGN.md §1) for every heuristic answer.
    memo : optional :class:`formulations.objective.UpdateMemo` of exact solves for THIS block, owned by the
        caller. Solvers pass it to ``optimal_update``, so the engine's re-score (and a later
        ``engine.update.batched_update(..., memos=[memo])``) reuses the solve of the final support instead
        of repeating it. None: nothing is remembered (``solve_block`` then makes a fresh one per call).
        Never share one memo between different blocks.
    certify_time : the budget for tightening the certificate of an answer (:mod:`engine.certificate`): None
        (default) = 5 % of the solve's time (the relaxation only when its fixed cost fits); 0 = the dual
        bound at the answer's residual and, when g = 0, the trivial bound 0; T > 0 = T seconds (relaxation,
        then branch and bound on blocks of at most 512 weights). Checked by the option table's definition.
    """

    time_limit: float | None = None
    seed: int = 0
    progress: bool = False
    evaluate: Callable[[np.ndarray], float] | None = None
    certify: bool = True
    memo: UpdateMemo | None = None
    certify_time: float | None = None

    def __post_init__(self) -> None:
        if self.time_limit is not None and not (
            isinstance(self.time_limit, (int, float)) and np.isfinite(self.time_limit) and self.time_limit > 0
        ):
            raise invalid_option("time_limit", "SolveOptions", "None or a finite number > 0", repr(self.time_limit))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise invalid_option("seed", "SolveOptions", "an integer >= 0", repr(self.seed))
        if self.certify_time is not None:
            from .settings import option

            object.__setattr__(self, "certify_time", option("certify_time").check(self.certify_time, "SolveOptions"))
        if self.memo is not None and not isinstance(self.memo, UpdateMemo):
            raise invalid_option("memo", "SolveOptions", "None or a formulations.objective.UpdateMemo", repr(self.memo))
