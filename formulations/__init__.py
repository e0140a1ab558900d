"""Numbers only (numpy/scipy): block problems, the objective, bounds and canonical models (DESIGN.md §1-2)."""

from .errors import CBSError, InvalidProblemError
from .objective import (
    IllConditionedWarning,
    dual_bound,
    optimal_update,
    quadratic_model,
    relative_gap,
    selection_objective,
    support_objective,
)
from .problem import BlockProblem

__all__ = [
    "BlockProblem",
    "CBSError",
    "InvalidProblemError",
    "IllConditionedWarning",
    "dual_bound",
    "optimal_update",
    "quadratic_model",
    "relative_gap",
    "selection_objective",
    "support_objective",
]
